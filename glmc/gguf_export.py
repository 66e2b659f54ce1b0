"""A GLM model written as GGUF for llama.cpp, so `glmc bench --peers` can time llama.cpp on
the very weights glmc compiled (the `gguf` package writes the file and quantizes).

Written from the reference model's fp32 state (transformers names), no tokenizer: the file
declares a vocabulary of `vocab_size` tokens and no tokenizer (`tokenizer.ggml.model`
"none"), so token ids go in and come out as they do in glmc. Architectures, as llama.cpp
names them:

  glm  -> chatglm: packed attn_qkv (+ bias), attn_output, ffn_up = [gate; up] (SwiGLU),
          ffn_down, RMSNorm; rotary on the first head_dim * partial_rotary_factor dims in
          adjacent pairs (llama.cpp's "norm" rope, GLM's interleaved rotary)
  glm4 -> glm4: the same plus post_attention_norm / post_ffw_norm (Glm4's post-norms)

Precision: F32, Q8_0 or Q4_0 (blocks of 32) on every 2-D weight, embedding and output
included ("--pure", as issue 14's table ran it); norms and biases stay F32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glmc.errors import GlmcError
from glmc.modelcfg import head_dim

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
_ARCH = {"glm": "chatglm", "glm4": "glm4"}
_LAYER = {          # transformers suffix inside model.layers.N. -> llama.cpp tensor
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_self_attn_layernorm.weight": "post_attention_norm.weight",     # glm4
    "post_mlp_layernorm.weight": "post_ffw_norm.weight",                # glm4
}


def quant_for(glmc_quant: str, dtype: str = "fp32") -> str:
    """The llama.cpp type timed beside a glmc artifact of this --quant (and, unquantized, --dtype)."""
    if glmc_quant == "none":
        return {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}[dtype]
    return {"int8": "Q8_0", "int4": "Q4_0"}[glmc_quant]


def write_gguf(state, config: dict, out: Path, qtype: str = "F32", spill: bool = False) -> Path:
    """state: transformers tensor name -> fp32 torch tensor (a dict, or anything with [] / in /
    get that reads on demand); config: the glm/glm4 config dict. spill: each tensor goes to a
    temporary file as it is added (a model larger than memory), not kept until the write."""
    import gguf

    if qtype not in QTYPES:
        raise GlmcError(f"gguf: precision {qtype!r} is not one of {', '.join(QTYPES)}")
    model_type = config.get("model_type")
    arch = _ARCH.get(model_type)
    if arch is None:
        raise GlmcError(f"gguf: no llama.cpp architecture for model_type {model_type!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise GlmcError(f"gguf: llama.cpp's {arch} runs SwiGLU, not hidden_act {config.get('hidden_act')!r}")
    H, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    D = head_dim(config)
    if heads * D != H:
        raise GlmcError(f"gguf: llama.cpp's {arch} needs heads x head_dim = hidden ({heads} x {D} != {H})")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise GlmcError(f"gguf: rope_type {rope.get('rope_type')!r} is not written")
    n_rot = int(D * config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)))
    w = gguf.GGUFWriter(str(out), arch, use_temp_file=spill)
    w.add_name("glmc-export")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(n_rot)
    w.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model("none")
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    kind = getattr(gguf.GGMLQuantizationType, qtype)

    def add(name: str, t) -> None:
        a = np.ascontiguousarray(_np(t))
        if a.ndim == 2 and qtype == "F16":
            w.add_tensor(name, a.astype(np.float16))
        elif a.ndim == 2 and qtype != "F32":
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)      # uint8: bytes per row
        else:
            w.add_tensor(name, a)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    add("output.weight", state["lm_head.weight" if "lm_head.weight" in state else "model.embed_tokens.weight"])
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        qkv = [state[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"]
        add(f"blk.{i}.attn_qkv.weight", np.concatenate([_np(t) for t in qkv]))
        if f"{p}self_attn.q_proj.bias" in state:
            add(f"blk.{i}.attn_qkv.bias", np.concatenate([_np(state[f"{p}self_attn.{x}_proj.bias"]) for x in "qkv"]))
        for suffix, name in _LAYER.items():
            if p + suffix in state:
                add(f"blk.{i}.{name}", state[p + suffix])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _np(t) -> np.ndarray:
    return t if isinstance(t, np.ndarray) else t.detach().float().numpy()


class _Reading:
    """A checkpoint's tensors (checkpoint.TensorSource) as write_gguf's state: each read, as
    fp32, when it is asked for."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __contains__(self, name):
        return name in self.tensors

    def __getitem__(self, name):
        return self.tensors.tensor(name)


def write_gguf_from_checkpoint(path, out: Path, qtype: str) -> Path:
    """A checkpoint directory (any size: one tensor in memory at a time) as GGUF."""
    from glmc.checkpoint import open_model

    loaded = open_model(path, purpose="exporting")
    return write_gguf(_Reading(loaded.tensors), dict(loaded.config, model_type=loaded.model_type), out, qtype,
                      spill=True)
