"""glmc against THUDM's original ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B-chat code.

glmc's own verification compares an artifact with glmc's mapping of the checkpoint onto
transformers' GlmForCausalLM, so a mapping mistake is invisible to it. These tests build
tiny random models with the release's own classes, save them in the release layout, and
compare glmc with the original code: the mapped model for every variant, and compiled
artifacts end to end for a subset (verification then ties artifact to mapped model).

Tolerances (fp32): logits within 1e-4 absolute (measured ~1e-6); greedy tokens identical.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import glmc
from glmc.checkpoint import load
from glmc.errors import GlmcError
from tests.chatglm_reference import RELEASES, greedy, logits, original_model, require_reference, save_release

ATOL = 1e-4
IDS = [5, 9, 200, 7, 100, 3, 44, 45, 17, 250]

# every config field that changes the math, varied one at a time
VARIANTS = {
    "release": {},
    "one-kv-group": dict(multi_query_group_num=1),
    "kv-channels-not-hidden-over-heads": dict(kv_channels=24),
    "no-qkv-bias": dict(add_qkv_bias=False),
    "eps": dict(layernorm_epsilon=0.05),
    "rope-ratio": dict(rope_ratio=16),
    "no-multi-query": dict(multi_query_attention=False),
    "tie-word-embeddings-flag": dict(tie_word_embeddings=True),
    "original-rope-false": dict(original_rope=False),
}


def _check(model, glmc_logits, ids=IDS):
    want = logits(model, torch.tensor([ids]))[0]
    diff = float((want - torch.as_tensor(glmc_logits)).abs().max())
    assert diff <= ATOL, f"max |dlogit| {diff:.2e} > {ATOL}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("release", RELEASES)
def test_mapped_model_matches_the_original_code(release, variant, tmp_path):
    folder = require_reference() / release
    model = original_model(folder, **VARIANTS[variant])
    mapped = load(save_release(model, folder, tmp_path / "ckpt")).model
    with torch.no_grad():
        _check(model, mapped(input_ids=torch.tensor([IDS])).logits[0])
        seq = list(IDS[:4])
        for _ in range(8):
            seq.append(int(mapped(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[4:] == greedy(model, IDS[:4], 8)


def _chatglm2_32k(tmp_path):
    """chatglm2-6b-32k's code is not in ../shared: it is chatglm2-6b's with one change, made
    here as text, that the release describes: positions are divided by config.rope_ratio."""
    src = require_reference() / "chatglm2-6b"
    folder = tmp_path / "chatglm2-6b-32k"
    shutil.copytree(src, folder)
    code = (folder / "modeling_chatglm.py").read_text()
    edits = [
        ("def __init__(self, dim, original_impl=False, device=None, dtype=None):",
         "def __init__(self, dim, rope_ratio=1, original_impl=False, device=None, dtype=None):"),
        ("        self.dim = dim\n", "        self.dim = dim\n        self.rope_ratio = rope_ratio\n"),
        ("seq_idx = torch.arange(seq_len, dtype=dtype, device=device)",
         "seq_idx = torch.arange(seq_len, dtype=dtype, device=device) / self.rope_ratio"),
        ("RotaryEmbedding(rotary_dim // 2, original_impl=config.original_rope,",
         "RotaryEmbedding(rotary_dim // 2, rope_ratio=config.rope_ratio, original_impl=config.original_rope,"),
    ]
    for old, new in edits:
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    (folder / "modeling_chatglm.py").write_text(code)
    return folder


def test_rope_ratio_that_divides_positions_is_read_from_the_shipped_code(tmp_path):
    folder = _chatglm2_32k(tmp_path)
    model = original_model(folder, rope_ratio=16)
    ckpt = save_release(model, folder, tmp_path / "ckpt")
    with torch.no_grad():
        _check(model, load(ckpt).model(input_ids=torch.tensor([IDS])).logits[0])
    # the same checkpoint with no code beside it: refused, naming the field and the flag
    (ckpt / "modeling_chatglm.py").unlink()
    with pytest.raises(GlmcError, match=r"rope_ratio=16.*--rope-ratio-as base\|positions"):
        load(ckpt)
    with torch.no_grad():
        _check(model, load(ckpt, rope_ratio_as="positions").model(input_ids=torch.tensor([IDS])).logits[0])
        wrong = load(ckpt, rope_ratio_as="base").model(input_ids=torch.tensor([IDS])).logits[0]
    assert float((logits(model, torch.tensor([IDS]))[0] - wrong).abs().max()) > 100 * ATOL   # the choice matters


def test_missing_output_layer_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = require_reference() / "chatglm3-6b"
    ckpt = save_release(original_model(folder, tie_word_embeddings=True), folder, tmp_path / "ckpt")
    state = load_file(ckpt / "model.safetensors")
    del state["transformer.output_layer.weight"]
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(GlmcError, match="output_layer.weight is missing"):
        load(ckpt)


@pytest.mark.parametrize("release,variant", [
    ("chatglm2-6b", dict(multi_query_attention=False)),               # per-head qkv, read lazily
    ("glm-4-9b-chat", dict(rope_ratio=500, kv_channels=32)),          # rotary base x500; the lean step graph
])
def test_compiled_artifact_matches_the_original_code(release, variant, tmp_path):
    folder = require_reference() / release
    model = original_model(folder, **variant)
    ckpt = save_release(model, folder, tmp_path / "ckpt")
    # compared with the original directly below, so compile-time verification is skipped
    art = glmc.compile(ckpt, tmp_path / "a.glmc", progress=False, max_seq_len=64, verify=False)
    rt = glmc.load(art)
    _check(model, rt.logits(IDS))
    assert rt.generate([IDS[:4], IDS[:7]], max_new_tokens=8) == [greedy(model, IDS[:4], 8), greedy(model, IDS[:7], 8)]


def test_compiled_32k_artifact_matches_the_original_code(tmp_path):
    folder = _chatglm2_32k(tmp_path)
    model = original_model(folder, rope_ratio=16)
    art = glmc.compile(save_release(model, folder, tmp_path / "ckpt"), tmp_path / "a.glmc", progress=False,
                       max_seq_len=64, verify=False)
    rt = glmc.load(art)
    _check(model, rt.logits(IDS))
    assert rt.generate(IDS[:5], max_new_tokens=8) == [greedy(model, IDS[:5], 8)]


def test_cli_names_rope_ratio_and_the_flag_when_the_checkpoint_cannot_tell(tmp_path):
    from click.testing import CliRunner

    from glmc.cli import main

    folder = require_reference() / "glm-4-9b-chat"
    ckpt = save_release(original_model(folder, rope_ratio=500), folder, tmp_path / "ckpt")
    (ckpt / "modeling_chatglm.py").unlink()
    out = tmp_path / "out.glmc"
    r = CliRunner().invoke(main, ["compile", str(ckpt), "-o", str(out), "--max-seq-len", "16"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "rope_ratio=500" in lines[0] and "--rope-ratio-as" in lines[0]
    assert not out.exists()
