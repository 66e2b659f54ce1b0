"""Size, quality and speed of glmc's quantized CPU builds (the README's quantization table).

    python bench/quant_report.py --out bench/results/quant-cpu.json

Quality: held-out perplexity of the trained fixture (tests/fixtures/glm-pystdlib, text
from Python's stdlib never seen in training) and top-1 agreement with the fp32 build,
for fp32 / int8 / int4-g128 round-to-nearest / int4-g128 calibrated (AWQ-style).
Size and speed: artifact and weight bytes, and CPU decode tokens/s (median of repeats,
batch 1, 16-token prompt) on small-glm for fp32 / int8 / int4-g128.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import glmc  # noqa: E402
from report_json import emit  # noqa: E402  (bench/, the script's own directory)
from glmc.measure import measure  # noqa: E402
from glmc.tokenizer import codec_for  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "glm-pystdlib"
VARIANTS = {
    "fp32": dict(quant="none"),
    "int8": dict(quant="int8"),
    "int4-g128 RTN": dict(quant="int4", group_size=128),
    "int4-g128 calibrated": dict(quant="int4", group_size=128, calibrate=16),
}


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(model, ids, chunk, n_chunks):
    nll, count, preds, logps = 0.0, 0, [], []
    chunks = [ids[i * chunk:(i + 1) * chunk] for i in range(n_chunks) if len(ids) >= (i + 1) * chunk]
    for logits, c in zip(model.logits(chunks), chunks):
        lp = log_softmax(logits[:-1].astype(np.float64))
        nll -= float(lp[np.arange(len(c) - 1), c[1:]].sum())
        count += len(c) - 1
        preds.append(logits[:-1].argmax(-1))
        logps.append(lp)
    return math.exp(nll / count), np.concatenate(preds), count, np.concatenate(logps)


def decode_tps(path, repeats, n=64):
    rt = glmc.load(path)
    prompt = list(range(5, 21))
    cache, last = rt.prefill([prompt])
    ids, pos = np.array([[int(last[0].argmax())]]), np.array([len(prompt)])

    def n_steps():      # n greedy-shaped decode steps rewriting the same slot (the cost is the step)
        for _ in range(n):
            rt.executor.decode(cache, ids, pos)

    t = measure(n_steps, repeats=repeats, warmup=1)
    return {"min": n / t["max"], "median": n / t["median"], "max": n / t["min"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", type=Path, default=FIXTURE)
    ap.add_argument("--speed-model", default="small-glm")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = {"fixture": str(args.fixture.name), "quality": {}, "speed_model": args.speed_model, "speed": {}}
    codec = codec_for("tokenizers", (args.fixture / "tokenizer.json").read_bytes(), {})
    held = codec.encode((args.fixture / "heldout.txt").read_text())
    with tempfile.TemporaryDirectory() as work:
        base_preds = base_lp = None
        for name, opts in VARIANTS.items():
            path = glmc.compile(args.fixture, Path(work) / f"q{len(report['quality'])}.glmc", max_seq_len=512, **opts)
            ppl, preds, n, lp = perplexity(glmc.load(path), held, args.chunk, args.chunks)
            base_preds = preds if base_preds is None else base_preds
            base_lp = lp if base_lp is None else base_lp
            comp = json.loads((path / "report.json").read_text())
            q = comp.get("quantization") or {}
            report["quality"][name] = {
                "perplexity": round(ppl, 4), "tokens": n,
                "top1_agreement_with_fp32": round(float((preds == base_preds).mean()), 4),
                "kl_from_fp32_per_token": float((np.exp(base_lp) * (base_lp - lp)).sum(-1).mean()),
                "block_packed_over_fp16": q.get("block_packed_over_fp16"),
                "artifact_bytes": comp["artifact_bytes"],
            }
            print(name, report["quality"][name], file=sys.stderr)
        fp32_ppl = report["quality"]["fp32"]["perplexity"]
        for r in report["quality"].values():
            r["perplexity_vs_fp32"] = round(r["perplexity"] / fp32_ppl - 1, 5)
        for name, opts in [("fp32", {}), ("int8", dict(quant="int8")), ("int4-g128", dict(quant="int4"))]:
            path = glmc.compile(args.speed_model, Path(work) / f"s-{name}.glmc", max_seq_len=512, **opts)
            comp = json.loads((path / "report.json").read_text())
            tps = decode_tps(path, args.repeats)
            report["speed"][name] = {
                "artifact_bytes": comp["artifact_bytes"],
                "weights_bytes": (path / "weights.safetensors").stat().st_size,
                "block_packed_over_fp16": (comp.get("quantization") or {}).get("block_packed_over_fp16"),
                "decode_tokens_per_s": tps,
            }
            print(name, report["speed"][name], file=sys.stderr)
        params = comp["parameters"]
        report["speed"]["fp16 (theoretical, no CPU fp16 build)"] = {"weights_bytes": params * 2}
        base = report["speed"]["fp32"]["decode_tokens_per_s"]["median"]
        for r in report["speed"].values():
            if "decode_tokens_per_s" in r:
                r["decode_speedup_vs_fp32"] = round(r["decode_tokens_per_s"]["median"] / base, 3)
    emit(report, args.out)


if __name__ == "__main__":
    main()
