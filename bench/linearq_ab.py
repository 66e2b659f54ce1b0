"""glmc's quantized linear kernels (backends/cpu/linearq.py) of this checkout against the same
module at another commit: one process, both built, calls alternating, so the machine's drift
(this 2-core host's bandwidth moves by +-40% within minutes) falls on both alike.

    python bench/linearq_ab.py --against HEAD~1 [--shapes glm4-9b|small-glm] [--bits 4|8]
                               [--block 128] [--layers 4] [--rows 1,4,16] [--rounds 40]
                               [--out bench/results/linearq-ab-cpu.json]

Per rows M: the set of linears (--layers layers' worth of one layer's four, distinct weights,
so each call streams its weight from memory; the lm_head alone with --shapes lm-head-*) timed
--rounds times for each version; reported: GMAC/s and weight GB/s (min/median/max) and the
per-round ratio this / against. Both versions' outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linearq import SHAPES as LAYER_SHAPES  # noqa: E402  (bench/linearq.py: one layer's four linears)
from report_json import emit  # noqa: E402  (bench/, the script's own directory)

SHAPES = {**LAYER_SHAPES, "lm-head-small-glm": [(1024, 32000)], "lm-head-glm4-9b": [(4096, 151552)]}   # (K, N)


def _module_at(rev: str, root: Path):
    """backends/cpu/linearq.py as of git revision `rev`, imported as a module of its own."""
    text = subprocess.run(["git", "-C", str(root), "show", f"{rev}:backends/cpu/linearq.py"], capture_output=True,
                          text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "linearq_against.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("linearq_against", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["linearq_against"] = module          # its dataclasses look themselves up here
    spec.loader.exec_module(module)
    return module


def _weights(L, shapes, layers: int, bits: int, block: int):
    import numpy as np

    from glmc.backends.cpu.linear16 import aligned_empty

    rng = np.random.default_rng(0)
    out = []
    for _ in range(layers):
        for K, N in shapes:
            V = L.block_width(N)
            if bits == 4:
                codes = aligned_empty((N // V, K // 8, V // 8, 32), np.uint8)
                codes[...] = rng.integers(0, 256, codes.shape, dtype=np.uint8)
                groups = K // block
            else:
                codes = aligned_empty((N // V, K // 4, V // 8, 32), np.int8)
                codes[...] = rng.integers(-127, 128, codes.shape, dtype=np.int8)
                groups = K // L.x_group(K)
            scales = aligned_empty((N // V, groups, V), np.float32)
            scales[...] = rng.random(scales.shape, dtype=np.float32) * 0.01
            out.append((K, N, codes, scales))
    return out


def main(argv=None) -> int:
    import numpy as np
    import tvm

    from glmc.backends.cpu import linearq
    from glmc.backends.cpu.linear16 import aligned_empty
    from glmc.measure import cpu_name, read_bandwidth_gbs, summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, help="the git revision to compare with")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="glm4-9b")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    versions = {"this": linearq, "against": _module_at(args.against, root)}
    shapes = SHAPES[args.shapes]
    weights = _weights(linearq, shapes, args.layers, args.bits, args.block)
    rows = [int(r) for r in args.rows.split(",")]
    calls = {}          # (version, M) -> [(call, y)]
    for name, L in versions.items():
        kernels = L.Kernels([(K, N, args.block if args.bits == 4 else L.x_group(K), args.bits) for K, N in shapes],
                            args.threads)
        for M in rows:
            bound = []
            for K, N, codes, scales in weights:
                x = aligned_empty((L.padded_rows(M), K), np.float32)
                x[...] = np.random.default_rng(1).standard_normal(x.shape)
                y = aligned_empty((L.padded_rows(M), N), np.float32)
                bound.append((kernels.bound(x, kernels.tensor((codes, scales)), y, M), y[:M]))
            calls[name, M] = bound
    for M in rows:
        for (a, ya), (b, yb) in zip(calls["this", M], calls["against", M]):
            a(), b()
            if not np.allclose(ya, yb, rtol=1e-5, atol=1e-5 * float(np.abs(yb).max())):
                raise SystemExit(f"the two versions' outputs differ at M = {M}")
    macs = args.layers * sum(K * N for K, N in shapes)
    nbytes = sum(c.nbytes + s.nbytes for _, _, c, s in weights)
    probes = [read_bandwidth_gbs(512, 3)]
    results = {}
    for M in rows:
        seconds = {name: [] for name in versions}
        for r in range(args.rounds + 2):
            for name in versions:
                t0 = time.perf_counter()
                for call, _ in calls[name, M]:
                    call()
                if r >= 2:                  # two warm-up rounds
                    seconds[name].append(time.perf_counter() - t0)
        probes.append(read_bandwidth_gbs(512, 3))
        this, against = np.array(seconds["this"]), np.array(seconds["against"])
        results[M] = {name: {"gmac_per_s": summarize(list(M * macs / np.array(s) / 1e9)),
                             "weight_gb_per_s": summarize(list(nbytes / np.array(s) / 1e9))}
                      for name, s in seconds.items()}
        results[M]["speedup_this_over_against"] = summarize(list(against / this))
    emit({"what": "glmc's quantized linear kernels, this checkout vs another commit, same process, alternating calls",
          "against": args.against, "shapes": args.shapes, "layer_linears_KxN": shapes, "bits": args.bits,
          "block": args.block if args.bits == 4 else "x_group(K)", "layers_cycled": args.layers,
          "rounds": args.rounds, "read_bandwidth_probes_gbs": [round(p, 1) for p in probes],
          "machine": {"cpu": cpu_name(), "platform": platform.platform(), "threads": args.threads},
          "versions": {"tvm": tvm.__version__}, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
