"""The cpu quantized linears' default, measured: one preset compiled with each --int4-matmul /
--int8-matmul choice, all the artifacts loaded in one process and timed alternating (this 2-core
host's bandwidth moves by +-40% within minutes, so separate runs compare nothing).

    python bench/matmul_default.py [--model small-glm] [--builds int4-nbits,int4-glmc,...]
                                   [--contexts 32,256,1024] [--prompts 32,128,512] [--rounds 4]
                                   [--work DIR] [--out bench/results/matmul-default-small-glm-cpu.json]

Builds (NAME: glmc compile options): int4-nbits / int4-glmc (group 128, the int8 lm_head on the
same kernels as the int4 linears), int4g32-nbits / int4g32-glmc, int8-nbits / int8-glmc /
int8-dynamic. Per round and build: decode ms per step after each context (the median of 40
greedy steps), prefill ms of each prompt length (the best of 3). Reported per build: min /
median / max over the rounds, and per round the ratio of each glmc build's time to its nbits
twin's (below 1: glmc faster).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)

BUILDS = {
    "int4-nbits": dict(quant="int4", int4_matmul="nbits", int8_matmul="nbits"),
    "int4-glmc": dict(quant="int4", int4_matmul="glmc", int8_matmul="glmc"),
    "int4g32-nbits": dict(quant="int4", group_size=32, int4_matmul="nbits", int8_matmul="nbits"),
    "int4g32-glmc": dict(quant="int4", group_size=32, int4_matmul="glmc", int8_matmul="glmc"),
    "int8-nbits": dict(quant="int8", int8_matmul="nbits"),
    "int8-glmc": dict(quant="int8", int8_matmul="glmc"),
    "int8-dynamic": dict(quant="int8", int8_matmul="dynamic"),
}


def _decode_ms(rt, context: int, steps: int = 40) -> float:
    ex = rt.executor
    cache, last = rt.prefill([list(range(5, 5 + context))])
    pos, tok, times = np.array([context]), int(last[0].argmax()), []
    for _ in range(steps + 5):
        t0 = time.perf_counter()
        tok = int(ex.decode(cache, np.array([[tok]]), pos)[0, 0].argmax())
        times.append(time.perf_counter() - t0)
        pos[0] += 1
    return float(np.median(times[5:]) * 1e3)


def _prefill_ms(rt, length: int) -> float:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        rt.prefill([list(range(5, 5 + length))])
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def _twin(name: str) -> str | None:
    """The nbits build a glmc / dynamic build is compared with."""
    base, _, kind = name.rpartition("-")
    return f"{base}-nbits" if kind != "nbits" else None


def main(argv=None) -> int:
    import glmc
    from glmc.measure import cpu_name, read_bandwidth_gbs, summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-glm")
    ap.add_argument("--builds", default="int4-nbits,int4-glmc,int4g32-nbits,int4g32-glmc,int8-nbits,int8-glmc,"
                                        "int8-dynamic")
    ap.add_argument("--contexts", default="32,256,1024")
    ap.add_argument("--prompts", default="32,128,512")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/glmc-matmul-default"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    names = args.builds.split(",")
    unknown = [n for n in names if n not in BUILDS]
    if unknown:
        ap.error(f"unknown builds {unknown}; choose from {', '.join(BUILDS)}")
    contexts = [int(c) for c in args.contexts.split(",")]
    prompts = [int(p) for p in args.prompts.split(",")]
    runtimes = {}
    args.work.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = args.work / f"{args.model}-{name}.glmc"
        if not path.exists():
            glmc.compile(args.model, path, verify=False, **BUILDS[name])
        runtimes[name] = glmc.load(path)
    for rt in runtimes.values():        # warm: kernels built, caches allocated
        _decode_ms(rt, 32, 5)
        _prefill_ms(rt, 32)
    probes, cells = [], {}
    for _ in range(args.rounds):
        probes.append(read_bandwidth_gbs())
        for kind, fn, values in (("decode", _decode_ms, contexts), ("prefill", _prefill_ms, prompts)):
            for v in values:
                for name, rt in runtimes.items():
                    cells.setdefault(f"{kind} {v}", {}).setdefault(name, []).append(fn(rt, v))
    table = {}
    for cell, by_build in cells.items():
        row = {}
        for name, ms in by_build.items():
            row[name] = {"ms": {k: round(x, 3) for k, x in summarize(ms).items() if k != "n"}}
            twin = _twin(name)
            if twin in by_build:
                row[name]["over_" + twin + "_per_round"] = [round(a / b, 3) for a, b in zip(ms, by_build[twin])]
        table[cell] = row
        print(cell, " | ".join(f"{n} {np.median(v):.2f}" for n, v in by_build.items()), file=sys.stderr)
    import onnxruntime
    import tvm

    emit({"model": args.model, "machine": {"cpu": cpu_name(), "platform": platform.platform()},
          "versions": {"glmc": glmc.__version__, "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__},
          "threads": next(iter(runtimes.values())).executor.threads, "rounds": args.rounds,
          "builds": {n: BUILDS[n] for n in names},
          "bandwidth_probe_gbs": [round(p, 1) for p in probes],
          "unit": "ms (decode: one step after the context; prefill: the whole prompt)", "cells": table},
         args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
