"""glmc::rotary: GLM's interleaved partial rotary with precomputed cos/sin tables."""

from __future__ import annotations

import torch

from glmc.registry import define


@define("rotary", fake=lambda x, positions, cos_table, sin_table: torch.empty_like(x), fp32_args=(2, 3))
def rotary(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
           sin_table: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary on the first R = 2 * cos_table.shape[1] dims of each head.

    x (B, H, T, D); positions (B, T) int64; tables (P, R/2). Pairs (x[2i], x[2i+1])
    rotate by angle positions * theta_i; dims R..D pass through (GLM's partial rotary).
    The tables stay fp32 in fp16/bf16 builds.
    """
    half = cos_table.shape[1]
    cos = cos_table[positions].unsqueeze(1).to(x.dtype)        # (B, 1, T, R/2)
    sin = sin_table[positions].unsqueeze(1).to(x.dtype)
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1)
