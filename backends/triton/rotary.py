"""Interleaved rotary embedding on the first R dims of each head (glmc::rotary),
GLM's partial rotary: dims R..D pass through.

One program per (b, h, t) row; element d pairs with d ^ 1, angle index d // 2:
  out[2i]   = x[2i] cos - x[2i+1] sin
  out[2i+1] = x[2i+1] cos + x[2i] sin
Every element is written once (no overlapping stores within a program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmc.backends.triton._common import Config, Launch, launch, check, next_pow2


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr,   # pointers
                   H, T, D, HALF,                                # sizes (HALF = R / 2)
                   sxb, sxh, sxt,                                # strides of x (last dim contiguous)
                   BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    t = pid % T
    h = (pid // T) % H
    b = pid // (T * H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    base = x_ptr + b.to(tl.int64) * sxb + h * sxh + t * sxt
    x = tl.load(base + d, mask=dmask, other=0.0)
    partner = tl.load(base + (d ^ 1), mask=dmask & (d < 2 * HALF), other=0.0)
    # angle of pair d // 2 at this token's position
    pos = tl.load(pos_ptr + b * T + t)
    rot = d < 2 * HALF
    c = tl.load(cos_ptr + pos * HALF + d // 2, mask=rot, other=1.0).to(x.dtype)
    s = tl.load(sin_ptr + pos * HALF + d // 2, mask=rot, other=0.0).to(x.dtype)
    sign = tl.where(d % 2 == 0, -1.0, 1.0).to(x.dtype)
    y = tl.where(rot, x * c + sign * partner * s, x)
    tl.store(out_ptr + pid.to(tl.int64) * D + d, y, mask=dmask)


def configs_cuda(d: int = 128) -> list[Config]:
    return [Config.of(num_warps=w, num_stages=1) for w in (1, 2, 4)]


def configs_rocm(d: int = 128) -> list[Config]:
    return [Config.of(num_warps=w, num_stages=1) for w in (1, 2)]


def default_config(d: int, vendor: str = "cuda") -> Config:
    return Config.of(num_warps=1, num_stages=1)


def rotary(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
           config: Config | None = None) -> torch.Tensor:
    """x (B, H, T, D), positions (B, T), tables (P, R/2) -> (B, H, T, D) contiguous."""
    check(x.dim() == 4, f"rotary: x must be (B, H, T, D), got shape {tuple(x.shape)}")
    B, H, T, D = x.shape
    half = cos_table.shape[1]
    check(2 * half <= D, f"rotary: rotary dims {2 * half} exceed head dim {D}")
    check(tuple(positions.shape) == (B, T), f"rotary: positions shape {tuple(positions.shape)} != {(B, T)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    launch(Launch(_rotary_kernel, (B * H * T,),
                    [x, positions.contiguous(), cos_table.contiguous(), sin_table.contiguous(), out,
                     H, T, D, half, x.stride(0), x.stride(1), x.stride(2)],
                    {"BLOCK_D": next_pow2(D)}, config or default_config(D),
                    ["x_ptr", "pos_ptr", "cos_ptr", "sin_ptr", "out_ptr", "H", "T", "D", "HALF",
                     "sxb", "sxh", "sxt"]))
    return out
