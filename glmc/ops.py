"""The fused ops passes rewrite into: torch custom ops `glmc::<name>`.

Each has a reference implementation in plain torch (so a rewritten graph still
runs, and tests compare against it) and a fake (shape) implementation for
torch.export. Backends lower them to something faster: the CPU backend to ONNX
Runtime contrib ops or compact ONNX (backends/cpu/ops.py).

Shapes: B batch, T query length, S cache length, H heads, Hkv KV heads, D head dim.
"""

from __future__ import annotations

import torch
from torch.library import custom_op


@custom_op("glmc::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), statistics in fp32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * y.to(x.dtype)).contiguous()


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@custom_op("glmc::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual; returns (rms_norm(h), h)."""
    h = x + residual
    return rms_norm(h, weight, eps), h.contiguous()


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    h = torch.empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=x.dtype, device=x.device)
    return torch.empty_like(h), h


@custom_op("glmc::swiglu", mutates_args=())
def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2I) packed [gate | up] -> (..., I) = silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return (up * torch.nn.functional.silu(gate)).contiguous()


@swiglu.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@custom_op("glmc::rotary", mutates_args=())
def rotary(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
           sin_table: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary on the first R = 2 * cos_table.shape[1] dims of each head.

    x (B, H, T, D); positions (B, T) int64; tables (P, R/2). Pairs (x[2i], x[2i+1])
    rotate by angle positions * theta_i; dims R..D pass through (GLM's partial rotary).
    """
    half = cos_table.shape[1]
    cos = cos_table[positions].unsqueeze(1).to(x.dtype)        # (B, 1, T, R/2)
    sin = sin_table[positions].unsqueeze(1).to(x.dtype)
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1)


@rotary.register_fake
def _(x, positions, cos_table, sin_table):
    return torch.empty_like(x)


@custom_op("glmc::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over [past_k; k], grouped-query, softmax in fp32.

    q (B, H, T, D); k, v (B, Hkv, T, D); past_k, past_v (B, Hkv, S, D) or None;
    mask (B, 1, T, S+T) additive. Returns (B, H, T, D). K/V heads are never
    repeated in memory: q is viewed as (B, Hkv, H/Hkv * T, D).
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if past_k is not None:
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
    # scores in fp32 from the start: an fp16 q.k can exceed 65504 before any softmax
    qg = q.reshape(B, Hkv, (H // Hkv) * T, D).float()
    scores = (qg @ k.float().transpose(-1, -2)) * scale               # (B, Hkv, rep*T, Tk)
    scores = scores.view(B, Hkv, H // Hkv, T, -1) + mask.float().unsqueeze(1)
    p = torch.softmax(scores, dim=-1).to(v.dtype).view(B, Hkv, (H // Hkv) * T, -1)
    return (p @ v).reshape(B, H, T, D)


@attention.register_fake
def _(q, k, v, mask, scale, past_k=None, past_v=None):
    return torch.empty_like(q)


@custom_op("glmc::linear_nbits", mutates_args=())
def linear_nbits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, K: int, bits: int, block_size: int) -> torch.Tensor:
    """x (..., K) @ dequant(W)^T + bias, W in glmc's packed format (glmc/quant.py)."""
    from glmc.quant import dequantize_parts

    w = dequantize_parts(qweight, scales, zeros, K, bits, block_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@linear_nbits.register_fake
def _(x, qweight, scales, zeros, bias, K, bits, block_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@custom_op("glmc::embedding_int8", mutates_args=())
def embedding_int8(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows of an int8 table (V, H) with one fp32 scale per row (V,)."""
    return qweight[ids].float() * scales[ids].unsqueeze(-1)


@embedding_int8.register_fake
def _(ids, qweight, scales):
    return torch.empty((*ids.shape, qweight.shape[1]), dtype=torch.float32, device=ids.device)
