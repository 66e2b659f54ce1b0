"""Quantized artifacts against the unquantized model, on each layout.

Thresholds: random-weight checkpoints have flat logits (near-ties everywhere), so
agreement is measured teacher-forced (same input sequence on both sides, argmax per
position): int8 >= 90%, int4 >= 40% of positions (chance is ~0.2%; a broken packing
gives ~0). Quality proper is judged on the trained fixture (test_fixture_perplexity.py).
"""

from __future__ import annotations

import json

import pytest
import torch

import glmc
from tests.conftest import VARIANTS

SEQS = [[5, 17, 42, 99, 3, 250, 8, 61, 7, 300, 4, 11, 12, 13, 14, 15, 16, 200, 201, 202],
        [33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44]]


def _agreement(model, ref):
    agree = total = 0
    for s in SEQS:
        got = model.logits(s).argmax(-1)
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([s])).logits[0].argmax(-1).numpy()
        agree += int((got == want).sum())
        total += len(s)
    return agree / total


@pytest.mark.parametrize("variant", ["glm-gqa", "glm4-mqa", "chatglm"])
@pytest.mark.parametrize("quant, threshold", [("int8", 0.9), ("int4", 0.4)])
def test_quantized_agrees_with_unquantized(variant, quant, threshold, artifacts, checkpoints, reference):
    path = artifacts(variant, quant=quant)
    model = glmc.load(path)
    assert _agreement(model, reference(checkpoints(variant))) >= threshold
    fp32 = artifacts(variant)
    assert (path / "weights.safetensors").stat().st_size < (fp32 / "weights.safetensors").stat().st_size
    q = json.loads((path / "report.json").read_text())["quantization"]
    assert q["linear_bytes_packed"] < 0.3 * q["linear_bytes_fp32"], q  # packed, scales and zero points included
    assert model.manifest["quant"] == quant
    assert len(model.generate([[5, 6, 7]], max_new_tokens=8)[0]) >= 1


def test_int8_embedding_is_the_quantized_default(artifacts, checkpoints, reference):
    fp = artifacts("glm-gqa", quant="int8", embedding="fp32")
    path = artifacts("glm-gqa", quant="int8")
    assert json.loads((path / "report.json").read_text())["quantization"]["embedding"] == "int8"
    model = glmc.load(path)
    assert _agreement(model, reference(checkpoints("glm-gqa"))) >= 0.9
    assert (path / "weights.safetensors").stat().st_size < (fp / "weights.safetensors").stat().st_size
    hist = json.loads((path / "manifest.json").read_text())["backend"]["op_histogram"]["step"]
    assert "Gather" in hist


def test_int4_lm_head_is_group_wise_int4(artifacts, checkpoints, reference):
    """--lm-head int4: the lm_head is a 4-bit MatMulNBits with the group size (here K = 64 is
    padded to the 128 block, so it is no smaller than int8 at this toy width), and the
    artifact still agrees with transformers."""
    import onnx

    head4 = artifacts("glm-gqa", quant="int4", lm_head="int4")
    graph = onnx.load(str(head4 / "step.onnx"), load_external_data=False).graph
    last = [n for n in graph.node if n.op_type == "MatMulNBits"][-1]
    attrs = {a.name: a.i for a in last.attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 128 and attrs["N"] == VARIANTS["glm-gqa"]["vocab_size"], attrs
    assert _agreement(glmc.load(head4), reference(checkpoints("glm-gqa"))) >= 0.4
