"""A real-size model on this machine: compile (int4, int8, bf16, cuda fp16 cross-compile), load,
prefill and decode, with wall time and peak RSS of each step.

    python tools/make_checkpoint.py glm4-9b /data/glm4-9b           # 18.8 GB bf16, ~2-3 min
    python bench/big_model.py /data/glm4-9b --work /data/glmc-big --out bench/results/glm4-9b-cpu.json

Each compile runs as its own `glmc compile` process and reports from its report.json
(peak RSS is the process's VmHWM). The runtime is measured in a child process too:
load time and RSS, prefill tokens/s at 128 and 1024 tokens, decode tokens/s (min /
median / max over steps) and decode's fraction of the bandwidth roofline: bytes a
decode step must read (the artifact's weights the step touches, plus the KV cache it
reads) / read bandwidth, measured in the same child just before; and the same per round
of --steps steps, each round against a probe taken right before it (min / median / max
over --decode-rounds rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)

_RUNTIME = r"""
import json, sys, time
import numpy as np
from glmc.measure import cpu_name, measure, peak_rss_mb, read_bandwidth_gbs, summarize

path, prompts, steps, rounds = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
bandwidth = read_bandwidth_gbs()
import glmc

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

t0 = time.perf_counter()
model = glmc.load(path)
ex = model.executor
load_s = time.perf_counter() - t0
out = {"cpu": cpu_name(), "read_bandwidth_gbs": round(bandwidth, 2), "load_seconds": round(load_s, 2),
       "rss_after_load_mb": round(rss_mb(), 1), "prefill": {}}
# sessions are built on first use (pre-packing the weights): build both, untimed
t0 = time.perf_counter()
warm = ex.new_cache(1)
ex.prefill(warm, np.array([[5, 6]]), np.ones((1, 2), np.int64))
ex.decode(warm, np.array([[7]]), np.array([2]))
from glmc import hugepages
hugepages.settle()      # its sessions' pre-packed weights moved onto 2 MB pages
out["first_use_seconds"] = round(time.perf_counter() - t0, 2)
out["rss_after_first_use_mb"] = round(rss_mb(), 1)
del warm
cache = None
for T in prompts:
    ids = (np.arange(T) % 1000 + 5)[None].astype(np.int64)
    times = []
    for _ in range(2):
        cache = ex.new_cache(1)
        t0 = time.perf_counter()
        last = ex.prefill(cache, ids, np.ones_like(ids))
        times.append(time.perf_counter() - t0)
    s = summarize(times)
    out["prefill"][str(T)] = {"tokens_per_s": {"min": round(T / s["max"], 2), "median": round(T / s["median"], 2),
                                               "max": round(T / s["min"], 2)}, "seconds": s}
pos = np.array([prompts[-1]])
tok = np.array([[int(last[0].argmax())]])
times, per_round = [], []
for _ in range(rounds):         # each round's steps right after a bandwidth probe of their own
    probe, mine = read_bandwidth_gbs(512, 3), []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = ex.decode(cache, tok, pos)
        mine.append(time.perf_counter() - t0)
        tok = np.array([[int(logits[0, 0].argmax())]])
        pos += 1
    times += mine
    per_round.append({"read_bandwidth_gbs": round(probe, 2), "median_step_seconds": float(np.median(mine))})
s = summarize(times)
out["decode"] = {"context": prompts[-1], "steps": steps * rounds, "seconds": s, "rounds": per_round,
                 "tokens_per_s": {"min": round(1 / s["max"], 3), "median": round(1 / s["median"], 3),
                                  "max": round(1 / s["min"], 3)}}
out["rss_after_generation_mb"] = round(rss_mb(), 1)
out["peak_rss_mb"] = round(peak_rss_mb(), 1)
print("RESULT" + json.dumps(out))
"""


def _compile(ckpt: Path, out: Path, args: list[str], reuse: bool = False) -> dict:
    cmd = [sys.executable, "-m", "glmc.cli", "compile", str(ckpt), "-o", str(out), *args]
    t0 = time.perf_counter()
    if not (reuse and (out / "report.json").exists()):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return {"command": " ".join(cmd[2:]), "error": (r.stderr or r.stdout).strip().splitlines()[-1]}
    report = json.loads((out / "report.json").read_text())
    return {"command": "glmc " + " ".join(cmd[4:]), "reused": reuse and time.perf_counter() - t0 < 60,
            "seconds": report["seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": report["peak_rss_mb"], "stage_seconds": report["stage_seconds"],
            "stage_peak_rss_mb": report.get("stage_peak_rss_mb"), "artifact_bytes": report["artifact_bytes"],
            "verify": report["verify"]}


def _decode_bytes(artifact: Path, context: int) -> int:
    """Bytes one decode step reads: every weight but the embedding table (one row of it) plus
    the KV cache's filled slots (a step reads only the slots in use)."""
    from glmc.modelcfg import head_dim
    from glmc.safetensors_check import read_header

    manifest = json.loads((artifact / "manifest.json").read_text())
    cfg = manifest["model"]["config"]
    header = read_header(artifact / manifest["backend"]["weights"])
    sizes = sorted(((h["data_offsets"][1] - h["data_offsets"][0], tuple(h["shape"]))
                    for k, h in header.items() if k != "__metadata__"), reverse=True)
    embed = next((n for n, shape in sizes if shape and shape[0] == cfg["vocab_size"]), 0)
    weights = sum(n for n, _ in sizes) - embed + embed // cfg["vocab_size"]
    kv_bytes = 2 if manifest["backend"].get("kv_cache") == "fp16" else 4
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * context * head_dim(cfg) * kv_bytes
    return weights + kv


def main(argv=None) -> int:
    from glmc.measure import summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--work", type=Path, required=True, help="where the artifacts are written")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quants", default="int4,int8",
                    help="int4, int8 (the default kernels: glmc's where they run), bf16 / fp16 (cpu --dtype), and "
                         "int4-glmc / int8-glmc or int4-nbits / int8-nbits (the same quantization with every int4 "
                         "and int8 linear on glmc's kernels / on MatMulNBits)")
    ap.add_argument("--cuda", default="cuda:sm_80,sm_90", help="cross-compile target ('' to skip)")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="compile without verification (it runs one layer at a time, as the reference does)")
    ap.add_argument("--prompts", default="128,1024")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round")
    ap.add_argument("--decode-rounds", type=int, default=3,
                    help="decode rounds, each after a bandwidth probe of its own (the machine's bandwidth drifts)")
    ap.add_argument("--reuse", action="store_true", help="measure artifacts that exist instead of recompiling")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    verify = [] if args.verify else ["--no-verify"]
    report = {"checkpoint": str(args.checkpoint), "config": json.loads((args.checkpoint / "config.json").read_text()),
              "compiles": {}, "runtime": {}, "cpu_count": os.cpu_count()}
    for quant in [q for q in args.quants.split(",") if q]:
        out = args.work / f"cpu-{quant}.glmc"
        flags = ["--dtype", quant] if quant in ("bf16", "fp16") else ["--quant", quant]     # 16-bit: unquantized
        base, _, kernels = quant.partition("-")
        if kernels in ("glmc", "nbits"):    # int4-nbits: every int4 and int8 linear on MatMulNBits
            flags = ["--quant", base, *(["--int4-matmul", kernels] if base == "int4" else []), "--int8-matmul", kernels]
        report["compiles"][f"cpu-{quant}"] = _compile(args.checkpoint, out, [*flags, *verify], args.reuse)
        r = subprocess.run([sys.executable, "-c", _RUNTIME, str(out), args.prompts, str(args.steps),
                            str(args.decode_rounds)],
                           capture_output=True, text=True)
        if r.returncode != 0 or "RESULT" not in r.stdout:
            report["runtime"][quant] = {"error": (r.stderr or r.stdout).strip().splitlines()[-1]}
            continue
        rt = json.loads(r.stdout.split("RESULT", 1)[1])
        nbytes = _decode_bytes(out, rt["decode"]["context"])
        roof = rt["read_bandwidth_gbs"] * 1e9 / nbytes
        rt["decode"]["bytes_per_token"] = nbytes
        rt["decode"]["roofline_tokens_per_s"] = round(roof, 3)
        rt["decode"]["fraction_of_roofline"] = round(rt["decode"]["tokens_per_s"]["median"] / roof, 3)
        # the same per round, against the probe taken just before that round's steps
        fractions = [nbytes / r["median_step_seconds"] / (r["read_bandwidth_gbs"] * 1e9) for r in rt["decode"]["rounds"]]
        rt["decode"]["fraction_of_roofline_by_round"] = {k: round(v, 3) if k != "n" else v
                                                          for k, v in summarize(fractions).items()}
        weights = (out / "weights.safetensors").stat().st_size
        rt["weight_bytes"] = weights
        rt["rss_over_weights"] = round(rt["rss_after_generation_mb"] * 2**20 / weights, 3)
        report["runtime"][quant] = rt
    if args.cuda:
        out = args.work / "cuda-fp16.glmc"
        report["compiles"]["cuda-fp16"] = _compile(args.checkpoint, out, ["--target", args.cuda, "--no-verify"],
                                                   args.reuse)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
