"""glmc::add_rms_norm: h = x + residual; returns (rms_norm(h), h)."""

from __future__ import annotations

import torch

from glmc.ops.rms_norm import reference as rms_norm_reference
from glmc.registry import define


def _fake(x, residual, weight, eps):
    h = torch.empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=x.dtype, device=x.device)
    return torch.empty_like(h), h


@define("add_rms_norm", fake=_fake)
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual; returns (rms_norm(h), h)."""
    h = x + residual
    return rms_norm_reference(h, weight, eps), h.contiguous()
