"""glmc's decode attention kernel (backends/cpu/attention.py) against onnxruntime's
GroupQueryAttention: the op alone, and a whole model's decode step with all of glmc's
decode kernels against onnxruntime's ops.

    python bench/attention.py [--shapes glm4-9b,small-glm] [--contexts 32,256,1024,2048]
                              [--prompt]
                              [--artifact A.glmc --decode-contexts 128,1024 --steps 16]
                              [--rounds 3] [--threads 2] [--out bench/results/attention-cpu.json]

The op alone: one decode step (B = 1) of a layer's attention, `--layers` layers' caches
cycled so each call reads its cache from memory; microseconds per call (min/median/max
over 9 timed passes per round, all rounds). With --prompt, a prompt of each `--contexts`
length instead (all its tokens in one call, the cache filled from slot 0): glmc's prompt
kernel against the same operator.

A whole model (--artifact, an `--int4-matmul glmc` / `--int8-matmul glmc` / 16-bit cpu
artifact: its split step is where the kernel runs): --steps greedy decode steps from
position `context` of an empty cache (no prefill: a step's work does not depend on what
the slots hold, and a 9B prompt of 1024 tokens takes over a minute), with
GLMC_CPU_DECODE_KERNELS=glmc and =onnxruntime: glmc's decode kernels (attention, norms,
SwiGLU) or onnxruntime's ops; seconds per step (min/median/max over the steps of all
rounds) and the read-bandwidth probe of each child.

Every measurement runs in a child process of its own, the engines alternating for
--rounds rounds (TVM's workers spin after a call and would take onnxruntime's cores; the
machine's speed drifts between minutes). Ratios are medians of the same run.
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

SHAPES = {"glm4-9b": (32, 2, 128, 32), "small-glm": (16, 2, 64, 16)}      # H, Hkv, D, rotary pairs


def _op_child(args) -> dict:
    import numpy as np
    import onnxruntime as ort

    from glmc.backends.cpu import attention
    from glmc.backends.cpu.linear16 import aligned_empty

    H, Hkv, D, half = SHAPES[args.shape]
    contexts = [int(c) for c in args.contexts.split(",")]
    S = max(contexts) + 1
    rng = np.random.default_rng(0)

    def array(shape, scale=1.0):
        a = aligned_empty(shape, np.float32)
        a[...] = rng.standard_normal(shape) * scale
        return a

    caches = [(array((1, Hkv, S, D)), array((1, Hkv, S, D))) for _ in range(args.layers)]
    angle = rng.uniform(0, 6.3, (S, half))
    cos, sin = array((S, half)), array((S, half))
    cos[...], sin[...] = np.cos(angle), np.sin(angle)
    seq, tot = aligned_empty((1,), np.int32), np.zeros((), np.int32)
    kernel = attention.Attention(H, Hkv, D, half, D ** -0.5, args.threads) if args.engine == "glmc" else None
    if kernel is None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(attention.groupquery_model(H, Hkv, D, half, D ** -0.5), opts,
                                    providers=["CPUExecutionProvider"])

    def bound(C: int) -> list:
        """One call per layer of C tokens (a decode step's one, or a prompt's C)."""
        qkv, out = array((1, C, (H + 2 * Hkv) * D)), array((1, C, H * D))
        if kernel is not None and args.prompt:
            return [lambda k=k, v=v: kernel.prompt(qkv, None, k, v, seq, cos, sin, out) for k, v in caches]
        if kernel is not None:
            return [kernel.bound(qkv[0], None, k, v, seq, cos, sin, out[0]) for k, v in caches]
        calls = []
        for k, v in caches:
            b = sess.io_binding()
            for name, a in (("qkv", qkv), ("seq", seq), ("tot", tot), ("cos", cos), ("sin", sin)):
                b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(a))
            b.bind_ortvalue_output("o", ort.OrtValue.ortvalue_from_numpy(out))
            for pair, a in ((("pk", "k"), k), (("pv", "v"), v)):
                value = ort.OrtValue.ortvalue_from_numpy(a)
                b.bind_ortvalue_input(pair[0], value)
                b.bind_ortvalue_output(pair[1], value)
            calls.append(lambda b=b: sess.run_with_iobinding(b))
        return calls

    if not args.prompt:
        calls = bound(1)
    times = {}
    for ctx in contexts:
        if args.prompt:         # a prompt of ctx tokens from slot 0: its last at ctx - 1
            calls, seq[0], tot[...] = bound(ctx), ctx - 1, ctx
        else:
            seq[0], tot[...] = ctx, ctx + 1
        samples = []
        for i in range(11):
            t0 = time.perf_counter()
            for call in calls:
                call()
            if i >= 2:
                samples.append((time.perf_counter() - t0) / len(calls) * 1e6)
        times[ctx] = samples
    return {"us_per_call": times}


_MODEL = r"""
import json, os, sys, time
import numpy as np
import glmc
from glmc.measure import read_bandwidth_gbs
path, contexts, steps = sys.argv[1], [int(c) for c in sys.argv[2].split(",")], int(sys.argv[3])
probe = read_bandwidth_gbs(512, 3)
model = glmc.load(path)
ex = model.executor
warm = ex.new_cache(1)
ex.prefill(warm, np.array([[5, 6]]), np.ones((1, 2), np.int64))
ex.decode(warm, np.array([[7]]), np.array([2]))
del warm
out = {}
for ctx in contexts:
    cache = ex.new_cache(1)         # slots 0 .. ctx - 1 left as zeros: a step's work is the same
    tok, pos, times = np.array([[5]]), np.array([ctx]), []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = ex.decode(cache, tok, pos)
        times.append(time.perf_counter() - t0)
        tok, pos = np.array([[int(logits[0, 0].argmax())]]), pos + 1
    out[ctx] = times
    del cache
print("RESULT" + json.dumps({"probe_gbs": probe, "seconds_per_step": out}))
"""


def _rounds(args, commands: dict) -> dict:
    """Each engine's child command run --rounds times, alternating: engine -> its results."""
    from glmc.settings import child_env

    runs = {engine: [] for engine in commands}
    for _ in range(args.rounds):
        for engine, (cmd, env) in commands.items():
            out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(**env))
            if out.returncode:
                raise SystemExit(f"the {engine} child failed: {out.stderr.strip().splitlines()[-1:]}")
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1]
            runs[engine].append(json.loads(line[len("RESULT"):]))
    return runs


def _summary(runs: dict, key: str, scale: float = 1.0) -> dict:
    from glmc.measure import summarize

    out = {}
    for engine, rounds in runs.items():
        out[engine] = {ctx: {k: (round(v * scale, 6) if k != "n" else v)
                             for k, v in summarize([t for r in rounds for t in r[key][ctx]]).items()}
                       for ctx in rounds[0][key]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="glm4-9b,small-glm")
    ap.add_argument("--contexts", default="32,256,1024,2048")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", action="store_true", help="time prompts of the --contexts lengths, not decode steps")
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--decode-contexts", default="128,1024")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--engine", choices=("glmc", "ort"), help=argparse.SUPPRESS)     # an op child's
    ap.add_argument("--shape", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine:
        print("RESULT" + json.dumps(_op_child(args)))
        return 0
    import onnxruntime
    import tvm

    from glmc.measure import cpu_name

    report = {"what": ("a prompt's" if args.prompt else "one decode step's")
              + " attention: glmc's TVM kernel vs onnxruntime's GroupQueryAttention",
              "machine": {"cpu": cpu_name(), "platform": platform.platform(), "threads": args.threads},
              "versions": {"onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__},
              "rounds": args.rounds, "op": {}, "model": None}
    for shape in [s for s in args.shapes.split(",") if s]:
        base = [sys.executable, __file__, "--shape", shape, "--contexts", args.contexts, "--layers",
                str(args.layers), "--threads", str(args.threads)] + ["--prompt"] * args.prompt + ["--engine"]
        runs = _rounds(args, {"glmc": (base + ["glmc"], {}), "onnxruntime": (base + ["ort"], {})})
        us = _summary(runs, "us_per_call")
        report["op"][shape] = {"heads_kv_heads_head_dim_rotary_pairs": SHAPES[shape], "us_per_call": us,
                               "speedup": {ctx: round(us["onnxruntime"][ctx]["median"] / us["glmc"][ctx]["median"], 2)
                                           for ctx in us["glmc"]}}
    if args.artifact:
        cmd = [sys.executable, "-c", _MODEL, str(args.artifact), args.decode_contexts, str(args.steps)]
        runs = _rounds(args, {mode: (cmd, {"GLMC_CPU_DECODE_KERNELS": mode}) for mode in ("glmc", "onnxruntime")})
        seconds = _summary(runs, "seconds_per_step")
        report["model"] = {"artifact": str(args.artifact), "steps": args.steps, "seconds_per_step": seconds,
                           "probes_gbs": {m: [round(r["probe_gbs"], 1) for r in rs] for m, rs in runs.items()},
                           "speedup": {ctx: round(seconds["onnxruntime"][ctx]["median"]
                                                  / seconds["glmc"][ctx]["median"], 3) for ctx in seconds["glmc"]}}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
