"""glmc beside ONNX Runtime GenAI and llama.cpp on the same weights, one configuration after
another in one process: the table of issue 14, from `glmc.benchmark.run(..., peers=True)`.

    pip install 'glmc[peers]'
    python bench/peers_table.py small-glm [--configs fp32,int4-g128,...] [--repeats 3]
                                [--out bench/results/peers-small-glm.json]

Each configuration compiles MODEL, builds the peers at the matching precision (ORT GenAI:
int4 with the same block size, accuracy level 4, lm_head int4 on both sides, no int8 build;
llama.cpp: F32 / F16 / BF16 / Q8_0 / Q4_0, Q4_0 in blocks of 32 whatever glmc's group size;
ORT GenAI also fp16, no bf16), checks each
against transformers and times prefill and decode (min / median / max over repeats).
Ratios are glmc over each peer, measured in the same run: the ratio of the medians, and the
ratios of the repeats paired up (min / median / max; the engines run in turn within each
repeat, so both sides of a paired ratio saw the host in the same state).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)

CONFIGS = {
    "fp32": {},                 # linears on glmc's fp32 kernels (the cpu default, --fp32-matmul auto)
    # int4 / int8 on glmc's kernels where they run (the cpu default, --int4/--int8-matmul auto)
    "int4-g128": dict(quant="int4", group_size=128, lm_head="int4"),
    "int4-g32": dict(quant="int4", group_size=32, lm_head="int4"),
    "int8": dict(quant="int8"),
    # the same weights on onnxruntime's MatMulNBits / DynamicQuantizeMatMul
    "int4-g128-nbits": dict(quant="int4", group_size=128, lm_head="int4", int4_matmul="nbits", int8_matmul="nbits"),
    "int4-g32-nbits": dict(quant="int4", group_size=32, lm_head="int4", int4_matmul="nbits", int8_matmul="nbits"),
    "int8-nbits": dict(quant="int8", int8_matmul="nbits"),
    "fp32-onnxruntime": dict(fp32_matmul="onnxruntime"),      # the same fp32 weights on onnxruntime's MatMul
    "int8-dynamic": dict(quant="int8", int8_matmul="dynamic"),
    # 16-bit linears on TVM kernels (glmc[cpu16]) beside llama.cpp's F16 / BF16 and ORT GenAI's fp16
    "fp16": dict(dtype="fp16"),
    "bf16": dict(dtype="bf16"),
}


def _row(r: dict) -> dict:
    if "error" in r:
        return {"error": r["error"]}
    return {
        "prefill_tokens_per_s": {L: round(p["tokens_per_s"], 1) for L, p in r["prefill"].items()},
        "prefill_seconds": {L: p["seconds"] for L, p in r["prefill"].items()},
        "decode_tokens_per_s": {C: round(d["tokens_per_s"], 1) for C, d in r["decode"].items()},
        "decode_seconds_per_token": {C: d["seconds_per_token"] for C, d in r["decode"].items()},
        "decode_roofline_fraction": {C: round(d["roofline_fraction"], 3) for C, d in r["decode"].items()},
        "check": r.get("check"),
        "precision": r.get("precision"),
        "version": r.get("version"),
    }


def main(argv=None) -> int:
    from glmc.benchmark import run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="small-glm")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, help="timed repeats per prompt length and context (default 3)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    report = {"model": args.model, "configs": {}}
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as d:
            rep = run(args.model, Path(d), skip=("eager", "compile", "ort-plain"), progress=False,
                      compile_options=CONFIGS[name], peers=True, repeats=args.repeats)
        report.setdefault("machine", rep["machine"])
        rows = {k: _row(v) for k, v in rep["results"].items()}
        glmc = rep["results"]["glmc"]
        ratios = {}
        for peer_name, peer in rep["results"].items():
            if peer_name == "glmc" or "error" in peer:
                continue
            ratios[peer_name] = {
                "prefill": {L: round(glmc["prefill"][L]["tokens_per_s"] / peer["prefill"][L]["tokens_per_s"], 3)
                            for L in glmc["prefill"]},
                "decode": {C: round(glmc["decode"][C]["tokens_per_s"] / peer["decode"][C]["tokens_per_s"], 3)
                           for C in glmc["decode"]},
                # each repeat's peer time over glmc's in the same repeat (glmc.benchmark.paired_ratios)
                **{k: rep["speedup_glmc_over"][peer_name][k] for k in ("prefill_paired", "decode_paired")},
            }
        report["configs"][name] = {"compile_options": CONFIGS[name], "results": rows,
                                   "glmc_over_peer": ratios, "settings": rep["settings"]}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
