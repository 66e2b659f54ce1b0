"""Facts derived from a (normalised) GLM config dict, computed in one place."""

from __future__ import annotations


def head_dim(cfg: dict) -> int:
    """head_dim when the config states it, else hidden_size / num_attention_heads."""
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def tensor_layer(name: str, n_layers: int) -> int | None:
    """Where a glm tensor name sits in the model's depth: -1 the embedding table, i decoder
    layer i, n_layers the final norm and lm_head; None for anything else."""
    import re

    found = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if found:
        return int(found.group(1))
    if name == "model.embed_tokens.weight":
        return -1
    if name in ("model.norm.weight", "lm_head.weight"):
        return n_layers
    return None
