"""RMSNorm and residual-add + RMSNorm (glmc::rms_norm, glmc::add_rms_norm).

One program per row; the row lives in registers (BLOCK_N = next power of two
>= hidden size), statistics in fp32. With a residual, h = x + residual is
rounded to the activation dtype before the norm, exactly as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmc.backends.triton._common import Config, Launch, launch, check, next_pow2


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, h_ptr,   # pointers
                     N, eps,                                    # sizes
                     HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    # load (and add the residual, rounded to the activation dtype like the reference)
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0)
    if HAS_RES:
        h = x + tl.load(res_ptr + row * N + offs, mask=mask, other=0.0)
        tl.store(h_ptr + row * N + offs, h, mask=mask)
        x = h
    # statistics in fp32
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    y = (xf * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def configs_cuda(n: int = 4096) -> list[Config]:
    return [Config.of(num_warps=w, num_stages=1) for w in (1, 2, 4, 8, 16) if w * 32 <= max(32, next_pow2(n))]


def configs_rocm(n: int = 4096) -> list[Config]:   # wave64: half as many warps cover a row
    return [Config.of(num_warps=w, num_stages=1) for w in (1, 2, 4, 8) if w * 64 <= max(64, next_pow2(n))]


def default_config(n: int, vendor: str = "cuda") -> Config:
    lanes = 32 if vendor == "cuda" else 64
    return Config.of(num_warps=max(1, min(16, next_pow2(n) // (8 * lanes))), num_stages=1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             config: Config | None = None):
    """rms_norm(x) or, with a residual, (rms_norm(x + residual), x + residual)."""
    N = x.shape[-1]
    check(weight.shape == (N,), f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {N}")
    check(residual is None or residual.shape == x.shape,
          f"rms_norm: residual shape {None if residual is None else tuple(residual.shape)} != x shape {tuple(x.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else out
    res = residual.contiguous() if residual is not None else x
    rows = x.numel() // max(N, 1)
    config = config or default_config(N, "cuda" if torch.version.hip is None else "rocm")
    launch(Launch(_rms_norm_kernel, (rows,), [x, res, weight, out, h, N, float(eps)],
                    {"HAS_RES": residual is not None, "BLOCK_N": next_pow2(N)}, config,
                    ["x_ptr", "res_ptr", "w_ptr", "out_ptr", "h_ptr", "N", "eps"]))
    return (out, h) if residual is not None else out
