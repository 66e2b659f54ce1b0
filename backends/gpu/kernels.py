"""glmc op -> Triton launcher, with the config the tuning table chose for its shape.

Each call goes through `_call(op, shape, run, vendor)`: `run(config)` launches the
kernel with a config (None: the kernel's default), `vendor()` computes the same thing
with torch (cuBLAS / rocBLAS), which the autotuner always considers too. An observer
(the autotuner's recorder) sees every call with its shape and both runners.
"""

from __future__ import annotations

import torch

from glmc.backends.triton import attention, matmul, rms_norm, rotary, swiglu
from glmc.backends.triton._common import Config

VENDOR = "torch"     # a tuning-table value: use the vendor library for this shape


class Configs:
    """Tuned choices keyed by (op, shape key); a missing key means the kernel's default."""

    def __init__(self, table: dict | None = None):
        self.table = {k: (v if v == VENDOR else Config.from_dict(v)) for k, v in (table or {}).items()}

    def get(self, op: str, *shape):
        return self.table.get(shape_key(op, *shape))


def shape_key(op: str, *shape) -> str:
    return f"{op}:" + "x".join(str(int(s)) for s in shape)


def matmul_m_bucket(M: int) -> int:
    """Tuning buckets for the token count: exact up to 4 (GEMV), then powers of two."""
    return M if M <= matmul.GEMV_MAX_M else 1 << (M - 1).bit_length()


# op -> the kernel module whose configs_cuda()/configs_rocm() take that op's shape key
SPACES = {"rms_norm": rms_norm, "swiglu": swiglu, "rotary": rotary, "attention": attention, "matmul": matmul,
          "matmul_int4": matmul, "matmul_int8": matmul}


def kernel_table(configs: Configs, observer=None) -> dict:
    def _call(op, shape, run, vendor=None):
        if observer is not None:
            observer(op, shape, run, vendor)
        choice = configs.get(op, *shape)
        if choice == VENDOR and vendor is not None:
            return vendor()
        return run(None if choice == VENDOR else choice)

    def _rms_norm(x, w, eps):
        return _call("rms_norm", (x.shape[-1],), lambda c: rms_norm.rms_norm(x, w, eps, config=c))

    def _add_rms_norm(x, r, w, eps):
        if r.shape != x.shape:
            return torch.ops.glmc.add_rms_norm.default(x, r, w, eps)
        return _call("rms_norm", (x.shape[-1],), lambda c: rms_norm.rms_norm(x, w, eps, residual=r, config=c))

    def _swiglu(gu):
        return _call("swiglu", (gu.shape[-1] // 2,), lambda c: swiglu.swiglu(gu, config=c))

    def _rotary(x, pos, cos_t, sin_t):
        return _call("rotary", (x.shape[-1],), lambda c: rotary.rotary(x, pos, cos_t, sin_t, config=c))

    def _attention(q, k, v, mask, scale, past_k=None, past_v=None):
        rows = q.shape[1] // k.shape[1] * q.shape[2]
        keys = q.shape[2] + (0 if past_k is None else past_k.shape[2])
        return _call("attention", (rows, keys), lambda c: attention.attention(q, k, v, mask, scale, past_k, past_v,
                                                                                config=c))

    def _linear(x, w, b=None):
        M = x.numel() // x.shape[-1]
        return _call("matmul", (matmul_m_bucket(M), w.shape[0], w.shape[1], 0),
                     lambda c: matmul.linear(x, w, b, config=c),
                     lambda: torch.nn.functional.linear(x, w, b))

    def _linear_nbits(x, q, s, z, b, K, bits, block_size):
        M = x.numel() // x.shape[-1]

        def vendor():
            from glmc.quant import dequantize_parts

            return torch.nn.functional.linear(x, dequantize_parts(q, s, z, K, bits, block_size).to(x.dtype), b)

        return _call(f"matmul_int{bits}", (matmul_m_bucket(M), q.shape[0], K, block_size),
                     lambda c: matmul.linear(x, q, b, s, z, K, bits, block_size, config=c), vendor)

    return {
        "glmc.rms_norm.default": _rms_norm,
        "glmc.add_rms_norm.default": _add_rms_norm,
        "glmc.swiglu.default": _swiglu,
        "glmc.rotary.default": _rotary,
        "glmc.attention.default": _attention,
        "glmc.linear_nbits.default": _linear_nbits,
        "aten.linear.default": _linear,
    }
