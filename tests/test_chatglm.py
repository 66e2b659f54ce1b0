"""The chatglm layout maps onto glm exactly (no trust_remote_code)."""

from __future__ import annotations

import json

import pytest
import torch

from glmc.checkpoint import load
from glmc.errors import GlmcError
from tests.conftest import VARIANTS, make_hf_model, write_checkpoint


def test_chatglm_layout_gives_identical_logits(tmp_path):
    glm_dir = tmp_path / "glm"
    make_hf_model(VARIANTS["chatglm"]).save_pretrained(glm_dir)
    chat_dir = write_checkpoint(tmp_path / "chat", "chatglm")
    assert json.loads((chat_dir / "config.json").read_text())["model_type"] == "chatglm"
    a, b = load(glm_dir), load(chat_dir)
    assert b.source_layout == "chatglm"
    ids = torch.tensor([[5, 9, 200, 7, 1000]])
    with torch.no_grad():
        assert torch.equal(a.model(input_ids=ids).logits, b.model(input_ids=ids).logits)


def test_chatglm_v1_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "position_encoding_2d": True,
                                                      "hidden_size": 64}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(GlmcError, match="first ChatGLM-6B"):
        load(tmp_path)


def test_chatglm_unsupported_option_is_named(tmp_path):
    chat_dir = write_checkpoint(tmp_path / "chat", "chatglm")
    cfg = json.loads((chat_dir / "config.json").read_text())
    cfg["add_bias_linear"] = True
    (chat_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GlmcError, match="add_bias_linear"):
        load(chat_dir)


def test_sharded_checkpoint_loads_identically(tmp_path):
    from tests.conftest import VARIANTS as V

    model = make_hf_model(V["glm-gqa"])
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    a, b = load(tmp_path / "one"), load(tmp_path / "sharded")
    ids = torch.tensor([[5, 9, 200, 7]])
    with torch.no_grad():
        assert torch.equal(a.model(input_ids=ids).logits, b.model(input_ids=ids).logits)


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(GlmcError, match="model_type 'llama' is not supported"):
        load(tmp_path)


def test_pickle_only_checkpoint_is_refused_with_a_conversion_hint(tmp_path):
    from tests.conftest import VARIANTS as V

    make_hf_model(V["glm-gqa"]).config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(GlmcError, match="safetensors only.*Convert with"):
        load(tmp_path)
