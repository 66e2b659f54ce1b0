"""The GPU lowering of every glmc op (and of aten.linear): a Triton launcher, with the
config the tuning table chose for its shape. Registered in glmc.registry with
`@kernel(op, module)`; the AOT kernel list and the tuner's config spaces derive from
these registrations.

Each call goes through `call(key, shape, run, vendor)`: `run(config)` launches the
kernel with a config (None: the kernel's default), `vendor()` computes the same thing
with torch (cuBLAS / rocBLAS), which the autotuner always considers too. An observer
(the autotuner's recorder) sees every call with its shape and both runners.
"""

from __future__ import annotations

from types import ModuleType

import torch

from glmc.backends.triton import attention, matmul, rms_norm, rotary, swiglu
from glmc.backends.triton._common import Config, Launcher
from glmc.registry import lowering, lowerings, ops

VENDOR = "torch"     # a tuning-table value: use the vendor library for this shape
ATEN_LINEAR = "aten.linear"


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


def kernel(op: str, module: ModuleType | None, tune_keys: tuple[str, ...] = ()):
    """Register fn(call, *op_args) as the GPU lowering of op, running `module`'s kernels;
    `tune_keys` are the tuning-table op names whose config space `module` defines."""

    def wrap(fn):
        fn.triton_module = module
        fn.tune_keys = tune_keys
        return lowering("gpu", op)(fn)

    return wrap


@kernel("rms_norm", rms_norm, ("rms_norm",))
def _rms_norm(call, x, w, eps):
    return call("rms_norm", (x.shape[-1],), lambda c: rms_norm.rms_norm(x, w, eps, config=c))


@kernel("add_rms_norm", rms_norm)
def _add_rms_norm(call, x, r, w, eps):
    if r.shape != x.shape:
        return torch.ops.glmc.add_rms_norm.default(x, r, w, eps)
    return call("rms_norm", (x.shape[-1],), lambda c: rms_norm.rms_norm(x, w, eps, residual=r, config=c))


@kernel("swiglu", swiglu, ("swiglu",))
def _swiglu(call, gu):
    return call("swiglu", (gu.shape[-1] // 2,), lambda c: swiglu.swiglu(gu, config=c))


@kernel("geglu", swiglu)
def _geglu(call, gu, approximate):
    # the same gated kernel and config space as swiglu
    return call("swiglu", (gu.shape[-1] // 2,), lambda c: swiglu.geglu(gu, approximate, config=c))


@kernel("rotary", rotary, ("rotary",))
def _rotary(call, x, pos, cos_t, sin_t):
    return call("rotary", (x.shape[-1],), lambda c: rotary.rotary(x, pos, cos_t, sin_t, config=c))


@kernel("attention", attention, ("attention",))
def _attention(call, q, k, v, mask, scale, past_k=None, past_v=None):
    rows = q.shape[1] // k.shape[1] * q.shape[2]
    keys = q.shape[2] + (0 if past_k is None else past_k.shape[2])
    return call("attention", (rows, keys), lambda c: attention.attention(q, k, v, mask, scale, past_k, past_v,
                                                                          config=c))


@kernel(ATEN_LINEAR, matmul, ("matmul",))
def _linear(call, x, w, b=None):
    M = x.numel() // x.shape[-1]
    return call("matmul", (matmul_m_bucket(M), w.shape[0], w.shape[1], 0),
                lambda c: matmul.linear(x, w, b, config=c),
                lambda: torch.nn.functional.linear(x, w, b))


@kernel("linear_nbits", matmul, ("matmul_int4", "matmul_int8"))
def _linear_nbits(call, x, q, s, z, b, K, bits, block_size):
    M = x.numel() // x.shape[-1]

    def vendor():
        from glmc.quant import dequantize_parts

        return torch.nn.functional.linear(x, dequantize_parts(q, s, z, K, bits, block_size).to(x.dtype), b)

    return call(f"matmul_int{bits}", (matmul_m_bucket(M), q.shape[0], K, block_size),
                lambda c: matmul.linear(x, q, b, s, z, K, bits, block_size, config=c), vendor)


@kernel("embedding_int8", None)
def _embedding_int8(call, ids, q, s):
    # a row gather: no kernel of its own; the reference (torch indexing) is the fast path
    return torch.ops.glmc.embedding_int8.default(ids, q, s)


def _graph_name(op: str) -> str:
    """The name a serialised graph gives op: glmc.NAME.default, aten.NAME.default."""
    return op + ".default" if op.startswith("aten.") else ops()[op].qualname


def kernel_table(configs: Configs, launcher: Launcher, observer=None) -> dict:
    """Graph op name -> callable, every call launched by `launcher` with its tuned config."""

    def call(op, shape, run, vendor=None):
        if observer is not None:
            observer(op, shape, run, vendor)
        choice = configs.get(op, *shape)
        if choice == VENDOR and vendor is not None:
            return vendor()
        with launcher.active():
            return run(None if choice == VENDOR else choice)

    return {_graph_name(op): (lambda *a, fn=fn, **kw: fn(call, *a, **kw)) for op, fn in lowerings("gpu").items()}


def kernel_modules() -> list[ModuleType]:
    """The Triton modules the registered GPU lowerings run (what AOT compiles and ships)."""
    mods = {fn.triton_module.__name__: fn.triton_module for fn in lowerings("gpu").values() if fn.triton_module}
    return [mods[k] for k in sorted(mods)]


def spaces() -> dict[str, ModuleType]:
    """Tuning-table op name -> the kernel module whose configs_cuda()/configs_rocm() take its shape."""
    return {key: fn.triton_module for fn in lowerings("gpu").values() for key in fn.tune_keys}
