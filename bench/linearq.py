"""glmc's int4 TVM kernels (backends/cpu/linearq.py) against onnxruntime's MatMulNBits
(accuracy level 4) on the same shapes: one transformer layer's four linears, several layers'
worth of distinct weights so that each call streams its weight from memory.

    python bench/linearq.py [--shapes glm4-9b|small-glm] [--block 32] [--layers 4]
                            [--rows 1,2,4,16,128] [--rounds 3] [--threads 2]
                            [--out bench/results/linearq-cpu.json]

Each engine runs in a process of its own (TVM's workers spin between calls and would take
onnxruntime's cores), the two alternating for --rounds rounds; each process measures the
machine's read bandwidth first. Per rows M: ms per layer (min/median/max over 7 timed
layer-sets per round, all rounds), and at M = 1 the weight bytes streamed per second as a
fraction of the same process's bandwidth probe. glmc's time includes quantizing the inputs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)

SHAPES = {   # (K, N) of qkv, dense, gate+up, down
    "glm4-9b": [(4096, 4608), (4096, 4096), (4096, 27392), (13696, 4096)],
    "small-glm": [(1024, 1536), (1024, 1024), (1024, 5632), (2816, 1024)],
}


def _weights(shapes, layers, block, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    for _ in range(layers):
        for K, N in shapes:
            codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
            scales = torch.rand(N, K // block, generator=gen) * 0.01
            yield K, N, codes, scales


def _run_glmc(shapes, layers, block, rows, threads):
    import numpy as np

    from glmc.backends.cpu import linearq as L
    from glmc.backends.cpu.linear16 import aligned_empty

    kernels = L.Kernels([(K, N, block, 4) for K, N in shapes], threads)
    weights = []
    for K, N, codes, scales in _weights(shapes, layers, block):
        c, s = L.pack_codes(codes).numpy(), L.pack_scales(scales).numpy()
        ca, sa = aligned_empty(c.shape, c.dtype), aligned_empty(s.shape, s.dtype)
        ca[...], sa[...] = c, s
        weights.append((K, N, kernels.tensor((ca, sa)), ca.nbytes + sa.nbytes))
    calls = {}
    for M in rows:
        bound = []
        for K, N, w, _ in weights:
            x = aligned_empty((L.padded_rows(M), K), np.float32)
            x[...] = np.random.default_rng(1).standard_normal(x.shape)
            bound.append(kernels.bound(x, w, aligned_empty((L.padded_rows(M), N), np.float32), M))

        def step(bound=bound):
            for call in bound:
                call()
        calls[M] = step
    return calls, sum(b for *_, b in weights)


def _run_ort(shapes, layers, block, rows, threads):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs, nbytes = [], [], [], 0
    for i, (K, N, codes, scales) in enumerate(_weights(shapes, layers, block)):
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(N, K // block, block // 2).numpy()
        inits += [numpy_helper.from_array(packed, f"q{i}"), numpy_helper.from_array(scales.numpy().reshape(-1), f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", [f"x{K}", f"q{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=block, accuracy_level=4))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", N]))
        nbytes += packed.nbytes + scales.numel() * 4
    widths = sorted({K for K, _ in shapes})
    ins = [helper.make_tensor_value_info(f"x{K}", TensorProto.FLOAT, ["M", K]) for K in widths]
    model = helper.make_model(helper.make_graph(nodes, "linears", ins, outs, inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    calls = {}
    for M in rows:
        feeds = {f"x{K}": np.random.default_rng(1).standard_normal((M, K)).astype(np.float32) for K in widths}
        calls[M] = lambda feeds=feeds: sess.run(None, feeds)
    return calls, nbytes


def _child(args) -> None:
    """One engine's round: a JSON line of per-M layer times (ms) and the bandwidth probe."""
    from glmc.measure import read_bandwidth_gbs

    shapes, rows = SHAPES[args.shapes], [int(r) for r in args.rows.split(",")]
    make = _run_glmc if args.engine == "glmc" else _run_ort
    calls, nbytes = make(shapes, args.layers, args.block, rows, args.threads)
    probe = read_bandwidth_gbs(512, 3)
    times = {}
    for M, step in calls.items():
        for _ in range(2):
            step()
        samples = []
        for _ in range(7):
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) / args.layers * 1e3)
        times[M] = samples
    print(json.dumps({"probe_gbs": probe, "bytes_per_layer": nbytes / args.layers, "ms_per_layer": times}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="glm4-9b")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", default="1,2,4,16,128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--engine", choices=("glmc", "ort"), help=argparse.SUPPRESS)     # a child's engine
    args = ap.parse_args(argv)
    if args.engine:
        _child(args)
        return 0
    import numpy as np
    import onnxruntime
    import tvm

    from glmc.measure import cpu_name, summarize
    from glmc.settings import child_env

    runs = {"glmc": [], "ort": []}
    for _ in range(args.rounds):
        for engine in runs:
            cmd = [sys.executable, __file__, "--engine", engine, "--shapes", args.shapes, "--block", str(args.block),
                   "--layers", str(args.layers), "--rows", args.rows, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
            if out.returncode:
                raise SystemExit(f"the {engine} child failed: {out.stderr.strip().splitlines()[-1:]}")
            runs[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {}
    for engine, rounds in runs.items():
        per_m = {}
        for M in rounds[0]["ms_per_layer"]:
            samples = [t for r in rounds for t in r["ms_per_layer"][M]]
            per_m[M] = summarize(samples)
        one = [r["bytes_per_layer"] / (np.median(r["ms_per_layer"]["1"]) / 1e3) / 1e9 / r["probe_gbs"]
               for r in rounds if "1" in r["ms_per_layer"]]
        results[engine] = {"ms_per_layer": per_m, "bytes_per_layer": rounds[0]["bytes_per_layer"],
                           "probes_gbs": [round(r["probe_gbs"], 1) for r in rounds],
                           "one_row_fraction_of_probe": [round(f, 3) for f in one]}
    ratios = {M: results["ort"]["ms_per_layer"][M]["median"] / results["glmc"]["ms_per_layer"][M]["median"]
              for M in results["glmc"]["ms_per_layer"]}
    emit({"what": "int4 linears of one layer: glmc's TVM kernels vs onnxruntime MatMulNBits accuracy_level 4, "
                  "ms per layer by rows M; speedup = MatMulNBits median / glmc median",
          "shapes": args.shapes, "layer_linears_KxN": SHAPES[args.shapes], "block": args.block,
          "layers_cycled": args.layers, "rounds": args.rounds,
          "machine": {"cpu": cpu_name(), "platform": platform.platform(), "threads": args.threads},
          "versions": {"onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__},
          "results": results, "speedup_glmc_vs_matmulnbits": {M: round(r, 3) for M, r in ratios.items()}}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
