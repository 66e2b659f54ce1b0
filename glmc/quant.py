"""Weight-only quantization: int8 per output channel, int4 group-wise (sym or asym).

Packed format (the one every backend consumes; it is onnxruntime's MatMulNBits layout):
  qweight  uint8 (N, n_blocks, block_size * bits / 8)   K padded with zeros to n_blocks * block_size;
                                                        4-bit codes two per byte, low nibble first
  scales   fp32  (N, n_blocks)
  zeros    uint8 (N, ceil(n_blocks * bits / 8)) or None  packed like the codes; None = symmetric,
                                                        implicit zero point 2^(bits-1)
value = (code - zero) * scale. int8 "per channel" uses one scale per output row,
replicated over its blocks (the layout wants blocks; the math is per-channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glmc.errors import GlmcError


@dataclass
class Packed:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    K: int
    N: int
    bits: int
    block_size: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2m) values in [0, 15] -> (..., m) bytes, element 2i in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def _check_block(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise GlmcError(f"group size must be a power of two >= 16, got {block_size}")


def quantize(w: torch.Tensor, bits: int, block_size: int, symmetric: bool = True) -> Packed:
    """w (N, K) float -> Packed. Raises GlmcError on non-finite weights or scales."""
    _check_block(block_size)
    if bits not in (4, 8):
        raise GlmcError(f"only 4- and 8-bit weights are supported, got {bits}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise GlmcError("cannot quantize a weight containing NaN or Inf")
    N, K = w.shape
    n_blocks = math.ceil(K / block_size)
    padded = torch.zeros(N, n_blocks * block_size)
    padded[:, :K] = w
    blocks = padded.view(N, n_blocks, block_size)
    qmax = 2**bits - 1
    if bits == 8 or symmetric:
        if bits == 8:  # per output channel: one scale per row, replicated over blocks
            amax = w.abs().amax(dim=1, keepdim=True).expand(N, n_blocks)
        else:
            amax = blocks.abs().amax(dim=-1)
        half = 2 ** (bits - 1)
        scales = amax / (half - 1)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))   # an all-zero block
        codes = torch.clamp(torch.round(blocks / scales[..., None]), -half, half - 1) + half
        zeros = None
    else:
        lo = blocks.amin(dim=-1).clamp(max=0)
        hi = blocks.amax(dim=-1).clamp(min=0)
        scales = (hi - lo) / qmax
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        zp = torch.clamp(torch.round(-lo / scales), 0, qmax)
        codes = torch.clamp(torch.round(blocks / scales[..., None]) + zp[..., None], 0, qmax)
        zeros = zp.to(torch.uint8)
        if bits == 4:
            if n_blocks % 2:
                zeros = torch.cat((zeros, torch.full((N, 1), 8, dtype=torch.uint8)), dim=1)
            zeros = _pack_nibbles(zeros)
    if not torch.isfinite(scales).all():
        raise GlmcError("quantization produced a non-finite scale")
    codes = codes.to(torch.uint8)
    qweight = _pack_nibbles(codes) if bits == 4 else codes
    return Packed(qweight.contiguous(), scales.float().contiguous(),
                  None if zeros is None else zeros.contiguous(), K, N, bits, block_size)


def dequantize(p: Packed) -> torch.Tensor:
    """Packed -> (N, K) fp32 weight."""
    return dequantize_parts(p.qweight, p.scales, p.zeros, p.K, p.bits, p.block_size)


def dequantize_parts(qweight, scales, zeros, K: int, bits: int, block_size: int) -> torch.Tensor:
    N, n_blocks = scales.shape
    codes = _unpack_nibbles(qweight) if bits == 4 else qweight
    codes = codes.view(N, n_blocks, block_size).float()
    if zeros is None:
        zp = torch.full((N, n_blocks), 2.0 ** (bits - 1), device=scales.device)
    else:
        zp = (_unpack_nibbles(zeros) if bits == 4 else zeros)[:, :n_blocks].float()
    w = (codes - zp[..., None]) * scales[..., None]
    return w.reshape(N, n_blocks * block_size)[:, :K]


def digest(w: torch.Tensor) -> str:
    """A content hash of a weight: how quantization results and calibration rows are keyed."""
    import hashlib

    return hashlib.blake2b(w.detach().contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
