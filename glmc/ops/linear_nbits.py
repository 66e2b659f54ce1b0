"""glmc::linear_nbits: a linear layer on int8/int4 weights in glmc's packed format."""

from __future__ import annotations

import torch

from glmc.registry import define


def _fake(x, qweight, scales, zeros, bias, K, bits, block_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@define("linear_nbits", fake=_fake, fp32_args=(2,))
def linear_nbits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, K: int, bits: int, block_size: int) -> torch.Tensor:
    """x (..., K) @ dequant(W)^T + bias, W in glmc's packed format (glmc/quant.py); scales stay fp32."""
    from glmc.quant import dequantize_parts

    w = dequantize_parts(qweight, scales, zeros, K, bits, block_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)
