"""THUDM's original ChatGLM2/ChatGLM3/GLM-4-chat code as an independent reference.

The release files live in ../shared/reference/chatglm/<release>/ (see SOURCES.md there).
They are imported the way transformers' remote-code loader does, as a package built from
that folder; nothing is copied into glmc. Tests that need them skip, visibly (pytest -rs),
when the folder is absent; GLMC_CHATGLM_REFERENCE points elsewhere.

Harness-side shims only, never edits to the math:
- `config.max_length` is set (transformers 5 dropped the attribute; the code only stores it);
- `empty_init=False`, and every parameter is then randomised here;
- full-sequence forwards with `use_cache=False` (the originals' cache code predates
  transformers 5's cache classes).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

REFERENCE = Path(os.environ.get("GLMC_CHATGLM_REFERENCE",
                                Path(__file__).resolve().parents[2] / "shared" / "reference" / "chatglm"))
RELEASES = ("chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat")


def require_reference() -> Path:
    if not (REFERENCE / "SOURCES.md").is_file():
        pytest.skip(f"THUDM reference code not found at {REFERENCE} (set GLMC_CHATGLM_REFERENCE)")
    return REFERENCE


def _package(folder: Path) -> str:
    name = "glmcref_" + "".join(c if c.isalnum() else "_" for c in str(folder))
    if name not in sys.modules:
        spec = importlib.util.spec_from_loader(name, loader=None, is_package=True)
        mod = importlib.util.module_from_spec(spec)
        mod.__path__ = [str(folder)]
        sys.modules[name] = mod
    return name


def module(folder: Path, name: str):
    """modeling_chatglm / configuration_chatglm / tokenization_chatglm of a release folder."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(f"{_package(folder)}.{name}")


TINY = dict(num_layers=2, padded_vocab_size=300, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
            num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
            seq_length=256, layernorm_epsilon=1e-5, rmsnorm=True, add_bias_linear=False, post_layer_norm=True,
            apply_residual_connection_post_layernorm=False, original_rope=True, eos_token_id=2, pad_token_id=0)


def original_model(folder: Path, seed: int = 0, **overrides):
    """A tiny random model built by the release's own classes (fp32, eval)."""
    import logging

    cfg_cls = module(folder, "configuration_chatglm").ChatGLMConfig
    modeling = module(folder, "modeling_chatglm")
    config = cfg_cls(**dict(TINY, **overrides))
    config.max_length = 8192
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = modeling.ChatGLMForConditionalGeneration(config, empty_init=False).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "layernorm" in name else 0.08 * torch.randn_like(p))
    return model


def save_release(model, folder: Path, path: Path) -> Path:
    """The checkpoint as the hub release lays it out: config.json (model_type chatglm, auto_map),
    model.safetensors with the original tensor names, and the release's .py files beside them."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.update(model_type="chatglm", architectures=["ChatGLMModel"],
               auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"})
    cfg.pop("max_length", None)
    (path / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    for f in folder.glob("*.py"):
        shutil.copy(f, path / f.name)
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens by full-sequence forwards (no cache)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(logits(model, torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]
