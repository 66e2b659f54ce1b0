"""glmc beside llama.cpp and ONNX Runtime GenAI on a real-size checkpoint: decode and
prefill, batch 1, this machine.

    python tools/make_checkpoint.py glm4-9b /data/glm4-9b
    glmc compile /data/glm4-9b -o /data/glm4-9b-int4.glmc --quant int4
    python bench/big_peers.py /data/glm4-9b --artifact /data/glm4-9b-int4.glmc --work /data/peers \\
        [--engines glmc,llama.cpp,ort-genai] --out bench/results/glm4-9b-cpu-peers.json

The peers' models are made once in --work and reused:
- llama.cpp: the checkpoint written as GGUF Q4_0 by glmc (glmc/gguf_export.py, one tensor in
  memory at a time; its mapping is the one tests/test_peers.py checks exact against
  transformers on small models).
- ONNX Runtime GenAI: its model builder on the checkpoint (glmc.peers.builder_view: the
  shards linked, the architecture named ChatGLMModel), int4 with the artifact's group size
  and accuracy level 4, as `glmc bench --peers` builds it on small models. Its builder holds
  more than the model in memory: on a 24 GB machine it is OOM-killed on the full GLM-4-9B
  (`--engines glmc,llama.cpp` there, or `tools/make_checkpoint.py --layers 8` for all three).
Each engine then runs in a child process of its own, --rounds times, alternating: the
read-bandwidth probe, load, a 128-token prefill, and --steps greedy decode steps after a
--context-token prompt (median step). Decode's roofline fraction is the bytes a step reads
(weights less the embedding table, plus the KV cache up to the context: glmc and ORT GenAI
fp32, llama.cpp its default F16) over the probe's bandwidth, in the same child.

There is no fp32 reference at this size, so the engines' last-token logits on one prompt are
compared with glmc's (relative RMS, top-1 agreement): a report, not a gate. Each quantizes
random weights to 4 bits its own way, so they differ by more than on a trained model.
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
elif engine == "ort-genai":
    import onnxruntime_genai as og
    model = og.Model(path)
    def generator(ids, room):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + room + 2, do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(list(ids))                 # runs the prompt
        return g
    def prefill(ids):
        generator(ids, 1)
    def start(ids):
        g = generator(ids, steps + 8)
        return {"g": g}, np.asarray(g.get_output("logits"))[0, -1].copy()
    def step(s):
        s["g"].generate_next_token()               # one run on the last token, then the greedy pick
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
if engine == "glmc":
    from glmc import hugepages
    hugepages.settle()                            # its sessions' pages moved before timing
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


def _machine() -> dict:
    import os
    import platform

    from glmc.measure import cpu_name

    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform()}


def _versions(engines: list[str]) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    packages = ["glmc", "onnxruntime", "apache-tvm", "torch", "transformers"]
    packages += [{"llama.cpp": "llama-cpp-python", "ort-genai": "onnxruntime-genai"}[e] for e in engines[1:]]
    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _ort_genai_embedding_bytes(model_dir: Path) -> int:
    """Bytes of the table the ORT GenAI model's first Gather reads (its embedding)."""
    import numpy as np
    import onnx
    from onnx import helper

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    table = next(inits[n.input[0]] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits)
    return int(np.prod(table.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(table.data_type)).itemsize


def _make_peer_models(args, engines: list[str], group_size: int, report: dict) -> dict[str, Path]:
    """Each engine's model path; the peers' are written into --work on first use."""
    paths = {"glmc": args.artifact}
    if "llama.cpp" in engines:
        from glmc.gguf_export import write_gguf_from_checkpoint

        paths["llama.cpp"] = args.work / "model-Q4_0.gguf"
        if not paths["llama.cpp"].is_file():
            t0 = time.perf_counter()
            write_gguf_from_checkpoint(args.checkpoint, paths["llama.cpp"], "Q4_0")
            report["gguf_write_seconds"] = round(time.perf_counter() - t0, 1)
    if "ort-genai" in engines:
        from glmc.peers import build_ort_genai, builder_view

        paths["ort-genai"] = args.work / f"ort-genai-int4-g{group_size}"
        if not (paths["ort-genai"] / "genai_config.json").is_file():
            t0 = time.perf_counter()
            view = builder_view(args.checkpoint, args.work / "hf-view")
            build_ort_genai(view, paths["ort-genai"], "int4", group_size, args.threads)
            report["ort_genai_build_seconds"] = round(time.perf_counter() - t0, 1)
    return paths


def main(argv=None) -> int:
    import numpy as np

    from glmc.measure import summarize
    from glmc.verify import _rel_rms

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--engines", default="glmc,llama.cpp,ort-genai")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    engines = ["glmc", *[e for e in args.engines.split(",") if e and e != "glmc"]]
    unknown = set(engines) - {"glmc", "llama.cpp", "ort-genai"}
    if unknown:
        ap.error(f"unknown engines {sorted(unknown)}: glmc, llama.cpp, ort-genai")
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"what": f"{' vs '.join(engines)}, batch 1, decode after a long prompt and a 128-token prefill",
              "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "versions": _versions(engines),
              "checkpoint": str(args.checkpoint), "artifact": str(args.artifact), "context": args.context,
              "steps": args.steps, "threads": args.threads, "rounds": args.rounds}
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    cfg = manifest["model"]["config"]
    paths = _make_peer_models(args, engines, manifest.get("group_size") or 128, report)
    L, kv, D = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_elems = 2 * L * args.context * kv * D

    from big_model import _decode_bytes  # noqa: E402  (bench/)

    step_bytes = {"glmc": _decode_bytes(args.artifact, args.context)}
    if "llama.cpp" in engines:
        import gguf

        reader = gguf.GGUFReader(str(paths["llama.cpp"]))
        emb = next(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
        del reader
        step_bytes["llama.cpp"] = paths["llama.cpp"].stat().st_size - emb + kv_elems * 2
    if "ort-genai" in engines:
        data = sum(f.stat().st_size for f in paths["ort-genai"].glob("model.onnx*"))
        step_bytes["ort-genai"] = data - _ort_genai_embedding_bytes(paths["ort-genai"]) + kv_elems * 4
    runs: dict[str, list] = {e: [] for e in engines}
    logits = {}
    for r in range(args.rounds):
        for engine in engines:
            npy = args.work / f"logits-{engine}.npy"
            done = subprocess.run([sys.executable, "-c", _CHILD, engine, str(paths[engine]), str(args.context),
                                   str(args.steps), str(args.threads), str(npy)], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{engine} failed: {done.stderr.strip()[-2000:]}")
            runs[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
            logits[engine] = np.load(npy)
            print(engine, r, runs[engine][-1], file=sys.stderr)
    report["engines"] = {}
    for engine, rs in runs.items():
        med = [x["decode_step_seconds"]["median"] for x in rs]
        report["engines"][engine] = {
            "decode_tokens_per_s": summarize([1 / m for m in med]),
            "prefill_128_tokens_per_s": summarize([128 / x["prefill_128_seconds"] for x in rs]),
            "read_bandwidth_gbs": summarize([x["read_bandwidth_gbs"] for x in rs]),
            "decode_bytes_per_step": step_bytes[engine],
            "decode_roofline_fraction": summarize([step_bytes[engine] / m / (x["read_bandwidth_gbs"] * 1e9)
                                                   for m, x in zip(med, rs)]),
            "load_seconds": summarize([x["load_seconds"] for x in rs]),
        }
    g = runs["glmc"]
    report["glmc_over_peer_per_round"] = {peer: {
        "decode": summarize([b["decode_step_seconds"]["median"] / a["decode_step_seconds"]["median"]
                             for a, b in zip(g, runs[peer])]),
        "prefill_128": summarize([b["prefill_128_seconds"] / a["prefill_128_seconds"] for a, b in zip(g, runs[peer])]),
    } for peer in engines[1:]}
    report["logits_vs_glmc"] = {peer: {"relative_rms": float(_rel_rms(logits[peer], logits["glmc"])),
                                       "same_top1": bool(logits["glmc"].argmax() == logits[peer].argmax())}
                                for peer in engines[1:]}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
