"""glmc bench --peers: the pieces that do not need a peer installed (tests never depend on
one): the checkpoint the ONNX Runtime GenAI builder reads, the correctness gate a peer must
pass before it is timed, and a missing peer reported in its row, not as a failure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

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


def test_builder_view_links_the_weights_and_names_the_architecture(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_hf_model(VARIANTS["glm-gqa"]).to(torch.bfloat16).save_pretrained(ckpt)
    view = peers.builder_view(ckpt, tmp_path / "view")
    assert json.loads((view / "config.json").read_text())["architectures"] == ["ChatGLMModel"]
    weights = view / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (ckpt / "model.safetensors").resolve()
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["GlmForCausalLM"]   # not touched
    assert not (ckpt / "tokenizer.json").exists()
    assert transformers.AutoTokenizer.from_pretrained(view).convert_tokens_to_ids("<eos>") == 1   # a stand-in


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
    art = artifacts("tiny-glm", quant="int4")
    rep = benchmark.run(str(art), tmp_path / "b", quick=True, skip=("eager", "ort-plain"), progress=False, peers=True)
    assert rep["results"]["ort-genai"] == {"error": "onnxruntime-genai is not installed"}
    # the roofline counts the bytes a step reads: every weight but the int8 embedding table
    # (its rows and their fp32 scales), not the weights less that table counted as fp32
    cfg = json.loads((art / "manifest.json").read_text())["model"]["config"]
    embedding = cfg["vocab_size"] * (cfg["hidden_size"] + 4)
    weights = (art / "weights.safetensors").stat().st_size
    for r in rep["results"]["glmc"]["decode"].values():
        read = r["gbs"] * 1e9 * r["seconds_per_token"]["median"]
        assert read >= 0.999 * (weights - embedding), (read, weights, embedding)
    assert "ort-genai" in (tmp_path / "b" / "report.md").read_text()


LLAMA_SPEC = dict(model_type="glm", vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5)


@pytest.mark.parametrize("qtype,tolerance", [("F32", 0.0), ("Q8_0", 0.01), ("Q4_0", 0.2)])
def test_gguf_holds_the_weights_llama_cpp_reads(tmp_path, qtype, tolerance):
    """glmc's GGUF writer: llama.cpp's chatglm tensors and hyperparameters, no tokenizer, every
    2-D weight at the requested type and equal to the model's (dequantized, relative error)."""
    gguf = pytest.importorskip("gguf", reason="gguf is a test dependency (pip install -e '.[test]')")
    from gguf.quants import dequantize

    from glmc.gguf_export import write_gguf

    model = make_hf_model(LLAMA_SPEC)
    state = model.state_dict()
    path = write_gguf(state, model.config.to_dict(), tmp_path / "m.gguf", qtype)
    r = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in r.fields.values()}

    def scalar(key):
        f = fields[key]
        return f.parts[f.data[0]].tobytes().decode() if f.types[0] == gguf.GGUFValueType.STRING else f.parts[f.data[0]][0]

    assert scalar("general.architecture") == "chatglm" and scalar("tokenizer.ggml.model") == "none"
    assert scalar("chatglm.rope.dimension_count") == 16 and scalar("chatglm.vocab_size") == 320
    assert scalar("chatglm.attention.head_count_kv") == 2 and scalar("chatglm.feed_forward_length") == 256
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 3 + 2 * 7
    qkv = torch.cat([state[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"]).numpy()
    for name, want in (("blk.1.attn_qkv.weight", qkv), ("token_embd.weight", state["model.embed_tokens.weight"].numpy()),
                       ("blk.0.ffn_up.weight", state["model.layers.0.mlp.gate_up_proj.weight"].numpy())):
        t = tensors[name]
        assert t.tensor_type.name == qtype, name
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert np.abs(got - want).max() <= tolerance * np.abs(want).max() + 1e-12, name
    assert tensors["blk.0.attn_qkv.bias"].tensor_type.name == "F32"
    with pytest.raises(GlmcError, match="heads x head_dim = hidden"):
        write_gguf(make_hf_model(VARIANTS["glm-gqa"]).state_dict(), make_hf_model(VARIANTS["glm-gqa"]).config.to_dict(),
                   tmp_path / "x.gguf")


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_llama_cpp_runs_the_gguf_like_transformers(tmp_path, model_type):
    """Only where llama-cpp-python is installed (glmc[peers]; skipped, listed by -rs, elsewhere):
    llama.cpp's logits on glmc's F32 GGUF equal transformers' (within 1e-4 with an F32 KV
    cache), and so do its greedy tokens."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional peer (pip install glmc[peers])")
    model = make_hf_model(dict(LLAMA_SPEC, model_type=model_type)).eval()
    cfg = model.config.to_dict()
    ids = [5, 6, 7, 8, 9, 10, 11]
    # an F32 KV cache: the GGUF mapping itself is exact (measured ~2e-6)
    exact = peers.LlamaCppProvider(model, cfg, tmp_path / "e", "none", threads=2, n_ctx=64, kv_f32=True)
    assert peers.check_logits(exact, model, ids, "none")["max_abs_diff"] <= 1e-4
    # llama.cpp's default F16 cache, as timed: inside the relative-RMS gate
    p = peers.LlamaCppProvider(model, cfg, tmp_path / "l", "none", threads=2, n_ctx=64)
    assert peers.check_logits(p, model, ids, "none")["relative_rms"] <= peers.FP16_CACHE_REL_RMS
    seq = list(ids)
    for _ in range(6):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert p.greedy(ids, 5) == seq[len(ids):]
