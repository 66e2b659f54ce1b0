"""glmc op -> Triton launcher, with the config the tuning table chose for its shape."""

from __future__ import annotations

import torch

from glmc.backends.triton import attention, matmul, rms_norm, rotary, swiglu
from glmc.backends.triton._common import Config


class Configs:
    """Tuned configs keyed by (op, shape key); a missing key means the kernel's default."""

    def __init__(self, table: dict | None = None):
        self.table = {k: Config.from_dict(v) for k, v in (table or {}).items()}

    def get(self, op: str, *shape) -> Config | None:
        return self.table.get(shape_key(op, *shape))


def shape_key(op: str, *shape) -> str:
    return f"{op}:" + "x".join(str(int(s)) for s in shape)


def matmul_m_bucket(M: int) -> int:
    """Tuning buckets for the token count: exact up to 4 (GEMV), then powers of two."""
    return M if M <= matmul.GEMV_MAX_M else 1 << (M - 1).bit_length()


def kernel_table(configs: Configs) -> dict:
    def _rms_norm(x, w, eps):
        return rms_norm.rms_norm(x, w, eps, config=configs.get("rms_norm", x.shape[-1]))

    def _add_rms_norm(x, r, w, eps):
        if r.shape != x.shape:
            return torch.ops.glmc.add_rms_norm.default(x, r, w, eps)
        return rms_norm.rms_norm(x, w, eps, residual=r, config=configs.get("rms_norm", x.shape[-1]))

    def _swiglu(gu):
        return swiglu.swiglu(gu, config=configs.get("swiglu", gu.shape[-1] // 2))

    def _rotary(x, pos, cos_t, sin_t):
        return rotary.rotary(x, pos, cos_t, sin_t, config=configs.get("rotary", x.shape[-1]))

    def _attention(q, k, v, mask, scale, past_k=None, past_v=None):
        rows = q.shape[1] // k.shape[1] * q.shape[2]
        keys = q.shape[2] + (0 if past_k is None else past_k.shape[2])
        return attention.attention(q, k, v, mask, scale, past_k, past_v,
                                   config=configs.get("attention", rows, keys, q.shape[-1]))

    def _linear(x, w, b=None):
        M = x.numel() // x.shape[-1]
        return matmul.linear(x, w, b, config=configs.get("matmul", matmul_m_bucket(M), w.shape[0], w.shape[1], 0))

    def _linear_nbits(x, q, s, z, b, K, bits, block_size):
        M = x.numel() // x.shape[-1]
        cfg = configs.get(f"matmul_int{bits}", matmul_m_bucket(M), q.shape[0], K, block_size)
        return matmul.linear(x, q, b, s, z, K, bits, block_size, config=cfg)

    return {
        "glmc.rms_norm.default": _rms_norm,
        "glmc.add_rms_norm.default": _add_rms_norm,
        "glmc.swiglu.default": _swiglu,
        "glmc.rotary.default": _rotary,
        "glmc.attention.default": _attention,
        "glmc.linear_nbits.default": _linear_nbits,
        "aten.linear.default": _linear,
    }
