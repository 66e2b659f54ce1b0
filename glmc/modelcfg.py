"""Facts derived from a (normalised) GLM config dict, computed in one place."""

from __future__ import annotations


def head_dim(cfg: dict) -> int:
    """head_dim when the config states it, else hidden_size / num_attention_heads."""
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
