"""glmc::swiglu: (..., 2I) packed [gate | up] -> (..., I) = silu(gate) * up."""

from __future__ import annotations

import torch

from glmc.registry import define


def _fake(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@define("swiglu", fake=_fake)
def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2I) packed [gate | up] -> (..., I) = silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return (up * torch.nn.functional.silu(gate)).contiguous()
