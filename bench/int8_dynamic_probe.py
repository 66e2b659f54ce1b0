"""int4, int8 and `--int8-matmul dynamic` int8 side by side through glmc's runtime: decode
steps at 1 and 16 rows and prefill (what `glmc serve` and long prompts see).

    python bench/int8_dynamic_probe.py [--model small-glm] [--rounds 3]
                                       [--out bench/results/int8-dynamic-probe.json]

Compiles MODEL at int4 (g128), int8 and int8 with `int8_matmul="dynamic"` (its decoder
linears on DynamicQuantizeMatMul, the lm_head on MatMulNBits; backends/cpu/lean.py), unverified
(compile's verification is tested elsewhere), then times, per artifact:

  decode step   ms at 1 row and at 16 rows (rows prefilled with 32 tokens), median of 40
                steps after 5, and the 16-row step against 16 one-row steps (own form, and
                the int4 artifact's: what `glmc serve` with 16 clients gains over sequential)
  prefill       128 tokens in one call, tokens/s, median of 5

`--rounds` alternates the three artifacts; reported as min / median / max over rounds.
bench/int8_forms_quality.py emulates what the dynamic form's rounding costs in quality.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)

PROMPT = list(range(5, 37))


def _time(path: Path) -> dict:
    import numpy as np

    import glmc

    ex = glmc.load(path).executor
    out = {"threads": ex.threads}
    for rows in (1, 16):
        cache = ex.new_cache(rows)
        ids = np.array([PROMPT] * rows)
        ex.prefill(cache, ids, np.ones_like(ids))
        pos, tok = np.full(rows, len(PROMPT)), np.full((rows, 1), 7)
        times = []
        for n in range(45):
            t0 = time.perf_counter()
            ex.decode(cache, tok, pos)
            if n >= 5:
                times.append(time.perf_counter() - t0)
            pos += 1
        out[f"step_ms_{rows}"] = float(np.median(times)) * 1e3
    long = np.arange(5, 133)[None]
    times = []
    for _ in range(5):
        cache = ex.new_cache(1)
        t0 = time.perf_counter()
        ex.prefill(cache, long, np.ones_like(long))
        times.append(time.perf_counter() - t0)
    out["prefill_128_tokens_per_s"] = 128 / float(np.median(times))
    return out


def main(argv=None) -> int:
    import onnxruntime

    import glmc
    from glmc.measure import cpu_name, summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-glm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        builds = {"int4": dict(quant="int4"), "int8": dict(quant="int8"),
                  "int8-dynamic": dict(quant="int8", int8_matmul="dynamic")}
        arts = {name: glmc.compile(args.model, work / f"{name}.glmc", verify=False, max_seq_len=256, **opts)
                for name, opts in builds.items()}
        rounds = {name: [] for name in arts}
        for _ in range(args.rounds):
            for name, path in arts.items():
                rounds[name].append(_time(path))
    int4_one = [r["step_ms_1"] for r in rounds["int4"]]
    results = {}
    for name, rs in rounds.items():
        results[name] = {
            "decode_step_ms_1_row": summarize([r["step_ms_1"] for r in rs]),
            "decode_step_ms_16_rows": summarize([r["step_ms_16"] for r in rs]),
            "16_rows_vs_16_own_steps": summarize([16 * r["step_ms_1"] / r["step_ms_16"] for r in rs]),
            "16_rows_vs_16_int4_steps": summarize([16 * i / r["step_ms_16"] for r, i in zip(rs, int4_one)]),
            "prefill_128_tokens_per_s": summarize([r["prefill_128_tokens_per_s"] for r in rs]),
        }
    emit({"what": "decode and prefill of int4, int8 and --int8-matmul dynamic int8 artifacts",
          "model": args.model, "rounds": args.rounds,
          "machine": {"cpu": cpu_name(), "threads": rounds["int4"][0]["threads"]},
          "versions": {"onnxruntime": onnxruntime.__version__}, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
