"""glmc::geglu: (..., 2I) packed [gate | up] -> (..., I) = gelu(gate) * up.

The MLP of GLM-family configs with hidden_act gelu (exact, erf) or gelu_new /
gelu_pytorch_tanh (tanh approximation): transformers' GlmMLP computes
up * act(gate) on the packed gate_up projection, the GeGLU of GLM-130B.
"""

from __future__ import annotations

import torch

from glmc.registry import define

APPROXIMATIONS = ("none", "tanh")


def _fake(gate_up, approximate):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@define("geglu", fake=_fake)
def geglu(gate_up: torch.Tensor, approximate: str) -> torch.Tensor:
    """(..., 2I) packed [gate | up] -> (..., I) = gelu(gate, approximate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return (up * torch.nn.functional.gelu(gate, approximate=approximate)).contiguous()
