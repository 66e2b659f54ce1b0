"""Prefill latency and decode tokens/s on CPU, glmc against the obvious alternatives, one run.

    python bench/compare_cpu.py small-glm --out bench/results/cpu-small-glm.json

Providers (same checkpoint, same threads):
  glmc         the default (fused) CPU artifact
  glmc-nofuse  compiled with --no-fuse
  eager        transformers' eager model (torch), KV cache, greedy loop
  ort-plain    onnxruntime on a plain torch.onnx.export of transformers' forward
               (no KV cache inputs, as a plain export gives: decode re-runs the sequence)

Every provider's greedy tokens are checked against eager before timing. Reported:
min/median/max over repeats, ratios to eager computed in this run, and decode
GB/s as a fraction of the machine's measured read bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import glmc  # noqa: E402
from report_json import emit  # noqa: E402  (bench/, the script's own directory)
from glmc.benchmark import EagerProvider, GlmcProvider, OrtPlainProvider, time_decode  # noqa: E402
from glmc.checkpoint import load as load_model  # noqa: E402
from glmc.measure import cpu_name, matmul_tflops, measure, read_bandwidth_gbs  # noqa: E402
from glmc.measure import summarize as stats  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="small-glm")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--providers", default="glmc,glmc-nofuse,eager,ort-plain")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    providers = args.providers.split(",")

    bw = read_bandwidth_gbs()
    peak = matmul_tflops()
    loaded = load_model(args.model)
    model = loaded.model
    cfg = loaded.config
    n_params = sum(p.numel() for p in model.parameters())
    # decode reads every weight once per token except the embedding table (one row)
    emb = model.get_input_embeddings().weight.numel()
    lm_head = model.get_output_embeddings().weight.numel()
    weight_bytes = 4 * (n_params - emb)
    # useful prefill work: every decoder matmul for each token, the lm_head for the last one
    prefill_flops = 2 * (n_params - emb - lm_head) * args.prefill + 2 * lm_head
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg["vocab_size"], args.prefill).tolist()
    short = prompt[:16]

    results = {}
    with tempfile.TemporaryDirectory() as work:
        built = {}
        for name in providers:
            t0 = time.perf_counter()
            try:
                if name == "glmc":
                    built[name] = GlmcProvider(glmc.compile(args.model, Path(work) / "f.glmc", max_seq_len=args.max_seq_len))
                elif name == "glmc-nofuse":
                    built[name] = GlmcProvider(glmc.compile(args.model, Path(work) / "n.glmc", max_seq_len=args.max_seq_len, fuse=False))
                elif name == "eager":
                    built[name] = EagerProvider(model)
                elif name == "ort-plain":
                    built[name] = OrtPlainProvider(model, work)
            except Exception as e:  # a baseline that fails is reported, not fatal
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            print(f"built {name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        want = EagerProvider(model).greedy(short, 8)
        for name, p in built.items():
            got = p.greedy(short, 8)
            if got != want:
                results[name] = {"error": f"greedy tokens differ from eager: {got} vs {want}"}
                continue
            pre = measure(lambda: p.prefill(prompt), args.repeats)["samples"]
            d = time_decode(p, short, args.decode, args.repeats)
            results[name] = {
                "prefill_s": stats(pre),
                "prefill_tokens_per_s": args.prefill / statistics.median(pre),
                "prefill_tflops": prefill_flops / statistics.median(pre) / 1e12,
                "prefill_peak_fraction": prefill_flops / statistics.median(pre) / 1e12 / peak,
                "decode_s_per_token": d,
                "decode_tokens_per_s": 1 / d["median"],
                "decode_gbs": weight_bytes / d["median"] / 1e9,
                "decode_roofline_fraction": weight_bytes / d["median"] / 1e9 / bw,
            }
            print(f"{name:<12} prefill {args.prefill}: {statistics.median(pre) * 1e3:8.1f} ms   "
                  f"({results[name]['prefill_peak_fraction']:.0%} of matmul peak)  "
                  f"decode: {1 / d['median']:7.1f} tok/s  ({results[name]['decode_roofline_fraction']:.0%} of bandwidth)",
                  file=sys.stderr)
    base = results.get("eager", {})
    for name, r in results.items():
        if "error" in r or "error" in base or not base:
            continue
        r["prefill_speedup_vs_eager"] = base["prefill_s"]["median"] / r["prefill_s"]["median"]
        r["decode_speedup_vs_eager"] = base["decode_s_per_token"]["median"] / r["decode_s_per_token"]["median"]
    report = {
        "model": args.model, "parameters": n_params, "weight_bytes_per_decode_token": weight_bytes,
        "prefill_tokens": args.prefill, "decode_tokens": args.decode, "repeats": args.repeats,
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                    "read_bandwidth_gbs": bw, "fp32_matmul_tflops": peak},
        "versions": {"glmc": glmc.__version__, "torch": torch.__version__,
                     "onnxruntime": __import__("onnxruntime").__version__},
        "results": results,
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
