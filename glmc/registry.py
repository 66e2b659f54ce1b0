"""The op registry: one `OpSpec` per fused op, and each backend's lowering of it.

A fused op is declared once, in its own file under glmc/ops/:

    @define("swiglu", fake=_fake)
    def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
        '''reference implementation in plain torch'''

which registers the torch custom op `glmc::swiglu` (schema from the annotations),
its fake (shape) implementation for torch.export, and which arguments stay fp32
when a backend casts weights to a lower compute dtype. Backends register how they
run it:

    @lowering("cpu", "swiglu")          # backends/cpu/ops.py: an ONNX function
    @lowering("gpu", "swiglu")          # backends/gpu/kernels.py: a Triton launcher

and derive their tables (ONNX translation table, GPU kernel table, the AOT kernel
list, the graph-op whitelist) from here. `glmc inspect`, the tests and the docs
list `ops()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.library import custom_op

from glmc.errors import GlmcError


@dataclass(frozen=True)
class OpSpec:
    name: str                       # "swiglu" -> torch.ops.glmc.swiglu
    reference: Callable             # plain torch; what tests compare every lowering to
    fake: Callable                  # shapes/dtypes only, for torch.export
    fp32_args: tuple[int, ...] = ()  # constant arguments kept fp32 under --dtype fp16/bf16
    doc: str = ""

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(torch.ops.glmc, self.name).default

    @property
    def qualname(self) -> str:
        """The op's name in serialised graphs (GPU JSON graphs, histograms): glmc.NAME.default."""
        return f"glmc.{self.name}.default"

    @property
    def schema(self) -> str:
        return str(self.overload._schema)


_OPS: dict[str, OpSpec] = {}
_LOWERINGS: dict[tuple[str, str], Callable] = {}


def define(name: str, *, fake: Callable, fp32_args: tuple[int, ...] = ()):
    """Declare the fused op glmc::NAME with the decorated function as its reference."""

    def wrap(fn: Callable):
        if name in _OPS:
            raise RuntimeError(f"glmc op {name!r} defined twice")
        op = custom_op(f"glmc::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        _OPS[name] = OpSpec(name, fn, fake, tuple(fp32_args), (fn.__doc__ or "").strip())
        return op

    return wrap


def lowering(backend: str, op: str):
    """Register the decorated function as `backend`'s implementation of op (a glmc op name,
    or an ATen op such as "aten.linear" that the backend also takes over)."""

    def wrap(fn: Callable):
        key = (backend, op)
        if key in _LOWERINGS:
            raise RuntimeError(f"{backend} lowering of {op!r} registered twice")
        _LOWERINGS[key] = fn
        return fn

    return wrap


def ops() -> dict[str, OpSpec]:
    import glmc.ops  # noqa: F401  (defines every op)

    return dict(_OPS)


def spec(name: str) -> OpSpec:
    try:
        return ops()[name]
    except KeyError:
        raise GlmcError(f"unknown glmc op {name!r}") from None


def lowerings(backend: str) -> dict[str, Callable]:
    """op name -> the backend's lowering; raises if a glmc op has none (a backend must run every op)."""
    table = {op: fn for (b, op), fn in _LOWERINGS.items() if b == backend}
    missing = sorted(set(ops()) - set(table))
    if missing:
        raise RuntimeError(f"the {backend} backend has no lowering for glmc ops {missing}")
    return table


def fp32_args() -> set[tuple[str, int]]:
    """(qualname, argument index) pairs whose constants stay fp32 in low-precision builds."""
    return {(s.qualname, i) for s in ops().values() for i in s.fp32_args}
