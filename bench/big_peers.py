"""glmc beside llama.cpp on a real-size checkpoint: decode and prefill, batch 1, this machine.

    python tools/make_checkpoint.py glm4-9b /data/glm4-9b
    glmc compile /data/glm4-9b -o /data/glm4-9b-int4.glmc --quant int4 --lm-head int4
    python bench/big_peers.py /data/glm4-9b --artifact /data/glm4-9b-int4.glmc --work /data/peers \\
        --out bench/results/glm4-9b-cpu-llamacpp.json

The checkpoint is written as GGUF Q4_0 by glmc (glmc/gguf_export.py, one tensor in memory at
a time; its mapping is the one tests/test_peers.py checks exact against transformers on small
models). Each engine then runs in a child process of its own, --rounds times, alternating:
the read-bandwidth probe, load, a 128-token prefill, and --steps greedy decode steps after a
--context-token prompt (median step). Decode's roofline fraction is the bytes a step reads
(weights less the embedding table, plus the KV cache up to the context: glmc fp32, llama.cpp
its default F16) over the probe's bandwidth, in the same child.

There is no fp32 reference at this size, so the two engines' last-token logits on one prompt
are compared with each other (relative RMS, top-1 agreement): a report, not a gate. Both
quantize random weights to 4 bits, so they differ by more than on a trained model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)

_CHILD = r"""
import json, sys, time
import numpy as np
from glmc.measure import read_bandwidth_gbs
engine, path, context, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
bw = read_bandwidth_gbs()
t0 = time.perf_counter()
if engine == "glmc":
    import glmc
    rt = glmc.load(path, threads=threads)
    def prefill(ids):
        return rt.prefill([ids])
    def start(ids):
        cache, last = rt.prefill([ids])
        return {"cache": cache, "tok": int(last[0].argmax()), "pos": np.array([len(ids)])}, last[0]
    def step(s):
        s["tok"] = int(rt.executor.decode(s["cache"], np.array([[s["tok"]]]), s["pos"])[0, 0].argmax())
        s["pos"] += 1
else:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=context + steps + 16, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    n = llm.n_vocab()
    last = lambda: np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n,))
    def prefill(ids):
        llm.reset(); llm.eval(ids)
    def start(ids):
        prefill(ids)
        return {"tok": int(last().argmax())}, last().copy()
    def step(s):
        llm.eval([s["tok"]]); s["tok"] = int(last().argmax())
load_s = time.perf_counter() - t0
probe = list(range(5, 13))
_, logits = start(probe)
prefill(list(range(5, 37)))                       # warm-up
ids = [5 + i % 1000 for i in range(128)]
t0 = time.perf_counter(); prefill(ids); prefill_s = time.perf_counter() - t0
s, _ = start([5 + i % 1000 for i in range(context)])
times = []
for _ in range(steps + 4):
    t0 = time.perf_counter(); step(s); times.append(time.perf_counter() - t0)
times = times[4:]
np.save(sys.argv[6], logits)
print(json.dumps({"read_bandwidth_gbs": bw, "load_seconds": load_s, "prefill_128_seconds": prefill_s,
                  "decode_step_seconds": {"min": min(times), "median": float(np.median(times)), "max": max(times)}}))
"""


def main(argv=None) -> int:
    import numpy as np

    from glmc.gguf_export import write_gguf_from_checkpoint
    from glmc.measure import summarize
    from glmc.verify import _rel_rms

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    gguf_path = args.work / "model-Q4_0.gguf"
    report = {"what": "glmc vs llama.cpp, batch 1, decode after a long prompt and a 128-token prefill",
              "checkpoint": str(args.checkpoint), "artifact": str(args.artifact), "context": args.context,
              "steps": args.steps, "threads": args.threads, "rounds": args.rounds}
    if not gguf_path.is_file():
        t0 = time.perf_counter()
        write_gguf_from_checkpoint(args.checkpoint, gguf_path, "Q4_0")
        report["gguf_write_seconds"] = round(time.perf_counter() - t0, 1)
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    cfg = manifest["model"]["config"]
    L, kv, D = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_elems = 2 * L * args.context * kv * D

    import gguf
    reader = gguf.GGUFReader(str(gguf_path))
    emb = next(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    del reader
    from big_model import _decode_bytes  # noqa: E402  (bench/)

    step_bytes = {"glmc": _decode_bytes(args.artifact, args.context),
                  "llama.cpp": gguf_path.stat().st_size - emb + kv_elems * 2}
    runs: dict[str, list] = {"glmc": [], "llama.cpp": []}
    logits = {}
    for r in range(args.rounds):
        for engine, path in (("glmc", args.artifact), ("llama.cpp", gguf_path)):
            npy = args.work / f"logits-{engine}.npy"
            out = subprocess.run([sys.executable, "-c", _CHILD, engine, str(path), str(args.context), str(args.steps),
                                  str(args.threads), str(npy)], check=True, capture_output=True, text=True).stdout
            runs[engine].append(json.loads(out.strip().splitlines()[-1]))
            logits[engine] = np.load(npy)
            print(engine, r, runs[engine][-1], file=sys.stderr)
    engines = {}
    for engine, rs in runs.items():
        med = [x["decode_step_seconds"]["median"] for x in rs]
        engines[engine] = {
            "decode_tokens_per_s": summarize([1 / m for m in med]),
            "prefill_128_tokens_per_s": summarize([128 / x["prefill_128_seconds"] for x in rs]),
            "read_bandwidth_gbs": summarize([x["read_bandwidth_gbs"] for x in rs]),
            "decode_bytes_per_step": step_bytes[engine],
            "decode_roofline_fraction": summarize([step_bytes[engine] / m / (x["read_bandwidth_gbs"] * 1e9)
                                                   for m, x in zip(med, rs)]),
            "load_seconds": summarize([x["load_seconds"] for x in rs]),
        }
    g, ll = runs["glmc"], runs["llama.cpp"]
    report["engines"] = engines
    report["glmc_over_llama_cpp_per_round"] = {
        "decode": summarize([b["decode_step_seconds"]["median"] / a["decode_step_seconds"]["median"] for a, b in zip(g, ll)]),
        "prefill_128": summarize([b["prefill_128_seconds"] / a["prefill_128_seconds"] for a, b in zip(g, ll)]),
    }
    a, b = logits["glmc"], logits["llama.cpp"]
    report["logits_glmc_vs_llama_cpp"] = {"relative_rms": float(_rel_rms(b, a)), "same_top1": bool(a.argmax() == b.argmax())}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
