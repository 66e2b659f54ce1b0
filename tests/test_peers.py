"""glmc bench --peers: the pieces that do not need a peer installed (tests never depend on
one): the checkpoint the ONNX Runtime GenAI builder reads, the correctness gate a peer must
pass before it is timed, and a missing peer reported in its row, not as a failure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import glmc.benchmark as benchmark
import glmc.peers as peers
from glmc.errors import GlmcError
from tests.conftest import VARIANTS, make_hf_model


def test_builder_checkpoint_names_the_architecture_it_knows(tmp_path):
    model = make_hf_model(VARIANTS["glm-gqa"])
    out = peers.write_hf_checkpoint(model, '{"x": 1}', tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["ChatGLMModel"] and cfg["model_type"] == "glm"
    assert (out / "tokenizer.json").read_text() == '{"x": 1}'
    with pytest.raises(GlmcError, match="no builder entry for model_type 'glm4'"):
        peers.write_hf_checkpoint(make_hf_model(VARIANTS["glm4-mqa"]), None, tmp_path / "hf4")


class _Fixed:
    name = "fixed"

    def __init__(self, logits):
        self.logits = logits

    def last_logits(self, ids):
        return self.logits


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_a_peer_is_checked_against_transformers_before_it_is_timed(quant):
    model = make_hf_model(VARIANTS["glm-gqa"]).eval()
    ids = [5, 6, 7, 8]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].numpy()
    near = ref + (1e-5 if quant == "none" else 0.1 * np.abs(ref).mean())
    assert peers.check_logits(_Fixed(near), model, ids, quant)["max_abs_diff"] > 0
    with pytest.raises(RuntimeError, match="logits disagree with transformers"):
        peers.check_logits(_Fixed(np.roll(ref, 1) * 3), model, ids, quant)


def test_a_missing_peer_is_a_row_with_its_reason(artifacts, tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "available", lambda: {"ort-genai": "onnxruntime-genai is not installed"})
    rep = benchmark.run(str(artifacts("tiny-glm", quant="int4")), tmp_path / "b", quick=True,
                        skip=("eager", "ort-plain"), progress=False, peers=True)
    assert rep["results"]["ort-genai"] == {"error": "onnxruntime-genai is not installed"}
    # the roofline counts the bytes a step reads: int8 embedding rows are not subtracted as fp32
    for r in rep["results"]["glmc"]["decode"].values():
        assert r["roofline_fraction"] > 1e-3, r
    assert "ort-genai" in (tmp_path / "b" / "report.md").read_text()
