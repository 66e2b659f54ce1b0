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


# ------------------------------------------------------------------ as recipes (glmc.weights)

from glmc.weights import Lazy, Multi  # noqa: E402  (weights does not import quant)


class _RowWise(Multi):
    """A row-wise Multi: remembers its last chunk (its parts ask for the same rows in turn)
    and keeps per-chunk error sums, so the report is right however it is chunked."""

    def __init__(self, x: Lazy):
        self.x = x
        self.shape = x.shape
        self.dtype = torch.uint8
        self._last: tuple | None = None
        self._err: dict[int, tuple[float, float]] = {}
        self.row: dict = {}

    def compute(self, r0, r1):
        if self._last is None or self._last[0] != (r0, r1):
            w = self.x.rows(r0, r1)
            outs, err2, w2 = self._compute(w)
            if r0 == 0 and r1 == self.x.shape[0]:
                self._err = {}
            self._err[r0] = (err2, w2)
            e2 = sum(e for e, _ in self._err.values())
            n2 = sum(n for _, n in self._err.values())
            self.row["relative_error"] = round(math.sqrt(e2) / max(math.sqrt(n2), 1e-30), 6)
            self._last = ((r0, r1), outs)
        return self._last[1]

    def release(self):
        self._last = None


class Quantized(_RowWise):
    """quantize(x [* act_scale]) as (qweight, scales[, zeros]); rows are output channels."""

    def __init__(self, x: Lazy, bits: int, block_size: int, symmetric: bool,
                 act_scale: torch.Tensor | None = None, alpha: float = 0.0):
        super().__init__(x)
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        # activation-aware (AWQ-style): W * s is quantized, the graph divides x by s
        self.act_scale, self.alpha = act_scale, alpha
        N, K = x.shape
        nb = math.ceil(K / block_size)
        outs = [((N, nb, block_size * bits // 8), torch.uint8), ((N, nb), torch.float32)]
        if not (bits == 8 or symmetric):
            outs.append(((N, math.ceil(nb * bits / 8)), torch.uint8))
        self.outputs = tuple(outs)
        self.row = {"bits": bits, "shape": list(x.shape), "alpha": alpha, "relative_error": None,
                    "bytes_fp32": N * K * 4, "bytes_packed": sum(math.prod(s) * (4 if d == torch.float32 else 1)
                                                                for s, d in outs)}

    @property
    def key(self):
        return ("quant", self.x.key, self.bits, self.block_size, self.symmetric, self.alpha)

    def _compute(self, w):
        s = self.act_scale
        p = quantize(w * s if s is not None else w, self.bits, self.block_size, self.symmetric)
        deq = dequantize(p) / s if s is not None else dequantize(p)
        err2 = float((deq - w.float()).pow(2).sum())
        outs = (p.qweight, p.scales) + ((p.zeros,) if p.zeros is not None else ())
        return outs, err2, float(w.float().pow(2).sum())


class EmbeddingInt8(_RowWise):
    """Per-row int8 embedding table: (codes int8, row scales fp32)."""

    def __init__(self, x: Lazy):
        super().__init__(x)
        self.outputs = (((x.shape[0], x.shape[1]), torch.int8), ((x.shape[0],), torch.float32))

    @property
    def key(self):
        return ("embed8", self.x.key)

    def _compute(self, w):
        wf = w.float()
        scale = (wf.abs().amax(dim=1) / 127).clamp_min(1e-12)
        q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
        err2 = float((q.float() * scale[:, None] - wf).pow(2).sum())
        return (q, scale), err2, float(wf.pow(2).sum())
