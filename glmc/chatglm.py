"""The original ChatGLM2/ChatGLM3/GLM-4-chat checkpoint layout, mapped onto `glm`.

Those releases ship modeling code for `trust_remote_code`; glmc never runs it.
Their math is the `glm` architecture (RMSNorm, fused QKV with bias, grouped
multi-query attention, interleaved rotary on the first half of each head,
SwiGLU with gate|up packed in dense_h_to_4h), so config and weights are renamed
and the fused QKV is split. `to_chatglm` is the inverse, used by tests to write
a chatglm-layout checkpoint from a glm one.
"""

from __future__ import annotations

import re

import torch

from glmc.errors import GlmcError

_PREFIX = "transformer."


ROPE_RATIO_MODES = ("base", "positions")

def rope_ratio_from_code(text: str | None) -> str | None:
    """How the modeling_chatglm.py shipped beside a checkpoint applies config.rope_ratio,
    read as text (never imported): 'base' (the rotary base is multiplied by it: ChatGLM3-6B-32k,
    GLM-4), 'positions' (positions are divided by it: chatglm2-6b-32k), 'unused' (the code never
    reads it: ChatGLM2-6B, ChatGLM3-6B), or None without the file."""
    if text is None:
        return None
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    if re.search(r"base\s*=\s*base\s*\*\s*self\.rope_ratio|base\s*\*\s*self\.rope_ratio", code):
        return "base"
    if re.search(r"/\s*self\.rope_ratio", code):
        return "positions"
    return "unused" if "rope_ratio" not in code else "unknown"


def config_from_chatglm(cfg: dict, modeling: str | None = None, rope_ratio_as: str | None = None) -> tuple[dict, list[str]]:
    """chatglm config.json -> (glm config dict for transformers.GlmConfig, notes for the user).

    modeling: the text of the modeling_chatglm.py beside the checkpoint, if any; it decides
    how rope_ratio applies unless rope_ratio_as ('base' | 'positions') says so."""
    if "multi_query_group_num" not in cfg and "position_encoding_2d" in cfg:
        raise GlmcError(
            "model_type 'chatglm' with position_encoding_2d is the first ChatGLM-6B "
            "(GLM-style 2D positions, GeLU): not supported; ChatGLM2/3 and GLM-4-chat are"
        )
    required = ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "padded_vocab_size"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise GlmcError(f"chatglm config.json lacks {', '.join(missing)}")
    unsupported = {
        "rmsnorm": (True, "LayerNorm instead of RMSNorm"),
        "add_bias_linear": (False, "biases on the dense/MLP projections"),
        "apply_residual_connection_post_layernorm": (False, "post-layernorm residuals"),
        "post_layer_norm": (True, "no final layer norm"),
        "fp32_residual_connection": (False, "an fp32 residual stream around half-precision layers"),
    }
    for key, (want, what) in unsupported.items():
        if key in cfg and bool(cfg[key]) != want:
            raise GlmcError(f"chatglm config {key}={cfg[key]} ({what}) is not supported")
    if cfg.get("pre_seq_len") is not None:
        raise GlmcError(f"chatglm config pre_seq_len={cfg['pre_seq_len']} (a P-tuning v2 prefix encoder) "
                        "is not supported; merge or drop the prefix")
    if cfg.get("quantization_bit"):
        raise GlmcError(f"chatglm config quantization_bit={cfg['quantization_bit']} (weights stored in ChatGLM's "
                        "own quantized format) is not supported; compile the fp16/bf16 release with --quant")
    notes: list[str] = []
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("kv_channels") or cfg["hidden_size"] // heads
    kv_heads = cfg["multi_query_group_num"] if cfg.get("multi_query_attention", False) else heads
    eos = cfg.get("eos_token_id")
    rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)
    ratio = cfg.get("rope_ratio", 1)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not ratio > 0:
        raise GlmcError(f"chatglm config rope_ratio={ratio!r} must be a positive number")
    if ratio != 1:
        how = rope_ratio_as or rope_ratio_from_code(modeling)
        if how is None or how == "unknown":
            why = ("no modeling_chatglm.py beside the checkpoint says which" if how is None
                   else "the modeling_chatglm.py beside the checkpoint reads it in a way glmc does not know")
            raise GlmcError(
                f"chatglm config rope_ratio={ratio}: releases apply it two ways (chatglm2-6b-32k divides "
                f"positions by it, ChatGLM3-6B-32k and GLM-4 multiply the rotary base) and {why}; "
                "pass --rope-ratio-as base|positions")
        if how not in ROPE_RATIO_MODES + ("unused",):
            raise GlmcError(f"--rope-ratio-as must be one of {', '.join(ROPE_RATIO_MODES)}, got {how!r}")
        if how == "base":
            rope["rope_theta"] = 10000.0 * float(ratio)
        elif how == "positions":
            rope.update(rope_type="linear", factor=float(ratio))
        else:
            notes.append(f"config.json: rope_ratio={ratio} is ignored, as the modeling_chatglm.py beside it "
                         "never reads it")
    return dict(
        model_type="glm",
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.get("seq_length", 8192),
        rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(cfg.get("add_qkv_bias", False)),
        rope_parameters=rope,
        # the original code never ties: it always reads transformer.output_layer.weight
        tie_word_embeddings=False,
        pad_token_id=cfg.get("pad_token_id", 0),
        eos_token_id=eos,
        bos_token_id=cfg.get("bos_token_id"),
    ), notes


def qkv_per_head(cfg: dict) -> bool:
    """Without multi-query attention, query_key_value holds [q_h; k_h; v_h] per head h; with it,
    three blocks [q; k; v]."""
    return not cfg.get("multi_query_attention", False)


def block_rows(heads: int, head_dim: int):
    """Stored row of each row of the [q; k; v] block layout, for a per-head packed tensor."""
    h = torch.arange(heads).view(1, heads, 1)
    part = torch.arange(3).view(3, 1, 1)
    d = torch.arange(head_dim).view(1, 1, head_dim)
    return (h * 3 * head_dim + part * head_dim + d).reshape(-1)


def config_to_chatglm(glm: dict) -> dict:
    rope = glm.get("rope_parameters") or {}
    theta = rope.get("rope_theta", glm.get("rope_theta", 10000.0))
    return dict(
        model_type="chatglm",
        architectures=["ChatGLMModel"],
        num_layers=glm["num_hidden_layers"],
        hidden_size=glm["hidden_size"],
        ffn_hidden_size=glm["intermediate_size"],
        num_attention_heads=glm["num_attention_heads"],
        kv_channels=glm["head_dim"],
        multi_query_attention=True,
        multi_query_group_num=glm["num_key_value_heads"],
        padded_vocab_size=glm["vocab_size"],
        seq_length=glm["max_position_embeddings"],
        layernorm_epsilon=glm["rms_norm_eps"],
        rmsnorm=True,
        add_qkv_bias=glm.get("attention_bias", True),
        add_bias_linear=False,
        apply_residual_connection_post_layernorm=False,
        post_layer_norm=True,
        original_rope=True,
        rope_ratio=theta / 10000.0,
        tie_word_embeddings=glm.get("tie_word_embeddings", False),
        pad_token_id=glm.get("pad_token_id"),
        eos_token_id=glm.get("eos_token_id"),
        bos_token_id=glm.get("bos_token_id"),
    )


_RENAMES = [  # chatglm suffix -> glm suffix, inside layer N
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    ("self_attention.dense.weight", "self_attn.o_proj.weight"),
    ("mlp.dense_h_to_4h.weight", "mlp.gate_up_proj.weight"),
    ("mlp.dense_4h_to_h.weight", "mlp.down_proj.weight"),
]
_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")


def weights_from_chatglm(tensors: dict[str, torch.Tensor], glm: dict) -> dict[str, torch.Tensor]:
    """Rename chatglm tensors to glm names; split query_key_value (in [q; k; v] block layout:
    see block_rows for per-head packing) into q/k/v."""
    q_size = glm["num_attention_heads"] * glm["head_dim"]
    kv_size = glm["num_key_value_heads"] * glm["head_dim"]
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name == _PREFIX + "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == _PREFIX + "encoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif name == _PREFIX + "output_layer.weight":
            out["lm_head.weight"] = t
        elif name.endswith("rotary_pos_emb.inv_freq"):
            continue  # recomputed from rope_theta
        elif m := _LAYER.fullmatch(name):
            layer, rest = m.groups()
            base = f"model.layers.{layer}."
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]  # weight | bias
                if t.shape[0] != q_size + 2 * kv_size:
                    raise GlmcError(
                        f"{name} has {t.shape[0]} rows; config implies {q_size}+2*{kv_size}"
                    )
                q, k, v = torch.split(t, [q_size, kv_size, kv_size], dim=0)
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{base}self_attn.{proj}.{kind}"] = part
            else:
                for src, dst in _RENAMES:
                    if rest == src:
                        out[base + dst] = t
                        break
                else:
                    out[name] = t  # left unmapped: reported as unexpected by the loader
        else:
            out[name] = t
    if _PREFIX + "output_layer.weight" not in tensors:
        raise GlmcError(f"{_PREFIX}output_layer.weight is missing: ChatGLM's code never ties the output "
                        "layer to the embedding, so the checkpoint must carry it")
    return out


def weights_to_chatglm(state: dict[str, torch.Tensor], glm: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i in range(glm["num_hidden_layers"]):
        base, dst = f"model.layers.{i}.", f"{_PREFIX}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            parts = [state.get(f"{base}self_attn.{p}.{kind}") for p in ("q_proj", "k_proj", "v_proj")]
            if all(p is not None for p in parts):
                out[f"{dst}self_attention.query_key_value.{kind}"] = torch.cat(parts, 0).contiguous()
        for src, glm_name in _RENAMES:
            out[dst + src] = state[base + glm_name].contiguous()
    out[_PREFIX + "embedding.word_embeddings.weight"] = state["model.embed_tokens.weight"].contiguous()
    out[_PREFIX + "encoder.final_layernorm.weight"] = state["model.norm.weight"].contiguous()
    lm = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    out[_PREFIX + "output_layer.weight"] = lm.contiguous()
    return out
