"""--int8-matmul dynamic (cpu): int8 linears run onnxruntime's DynamicQuantizeMatMul over the
same per-column int8 codes MatMulNBits runs (backends/cpu/lean.py: _int8_dynamic). Checked on
the trained fixture, where compile's verification against transformers passes at int8's
bounds (each layer's own relative error <= 0.1); its perplexity is in
tests/quant/test_fixture_perplexity.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import glmc

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "glm-pystdlib"


def test_dynamic_int8_runs_the_same_weights_through_the_integer_gemm(tmp_path):
    dyn = glmc.compile(FIXTURE, tmp_path / "dyn.glmc", quant="int8", int8_matmul="dynamic", max_seq_len=128)
    nbits = glmc.compile(FIXTURE, tmp_path / "nbits.glmc", quant="int8", int8_matmul="nbits", max_seq_len=128,
                         verify=False)
    report = json.loads((dyn / "report.json").read_text())
    assert report["verify"]["ok"] and report["verify"]["measure"] == "layer_relative_error", report["verify"]
    assert report["quantization"]["int8_matmul"] == "dynamic"
    hist = {name: glmc.load(a).manifest["backend"]["op_histogram"]["step"] for name, a in (("dyn", dyn), ("nbits", nbits))}
    linears = hist["nbits"]["com.microsoft::MatMulNBits"]      # every linear is int8 (lm_head too)
    assert hist["dyn"].get("com.microsoft::DynamicQuantizeMatMul") == linears - 1, hist
    assert hist["dyn"]["com.microsoft::MatMulNBits"] == 1, hist   # the lm_head keeps MatMulNBits
    # one copy of the weights whichever kernel runs them: the files are byte for byte the same
    assert (dyn / "weights.safetensors").read_bytes() == (nbits / "weights.safetensors").read_bytes()
    # the codes' layout is folded by onnxruntime when the session is built, not run per step
    a, b = glmc.load(dyn), glmc.load(nbits)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    la, lb = a.logits(prompts), b.logits(prompts)
    for x, y in zip(la, lb):        # the same model but for the activations' rounding
        assert 0 < float(np.sqrt(((x - y) ** 2).mean() / (y ** 2).mean())) < 0.1
    # generation runs (not compared row by row with a row alone: the activations of a whole
    # call share one scale, so a row's rounding depends on its batch; see the README)
    assert [len(o) for o in a.generate(prompts, 8, stop_at_eos=False)] == [8, 8]
