"""Small helpers over torch.fx graphs of ATen ops, and what a pass receives and returns."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

import torch

from glmc.target import Target
from glmc.weights import WeightBook

ENTRIES = ("prefill", "decode", "extend", "score")


def op_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}" + (
            f".{t._overloadname}" if t._overloadname != "default" else ""
        )
    return getattr(t, "__name__", str(t))


def histogram(gm: torch.fx.GraphModule) -> Counter:
    return Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")


def node_count(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


@dataclass(frozen=True)
class QuantConfig:
    """How quantize_weights rewrites linears (and what the cpu lowering of them asks of onnxruntime)."""

    mode: str = "none"              # none | int8 | int4
    group_size: int = 128           # int4 group along K
    symmetric: bool = True          # int4 without zero points
    lm_head: str = "int8"           # int8 | int4 (group-wise) | none (keep fp32)
    embedding: str = "fp32"         # fp32 | int8
    accuracy_level: int = 4         # onnxruntime MatMulNBits: 4 = int8 activations in the kernel
    kv_cache: str = "fp32"          # cpu KV-cache storage: fp32 | fp16 (attention still computes in fp32)
    int8_matmul: str = "auto"       # cpu int8 linears: nbits (MatMulNBits) | dynamic (DynamicQuantizeMatMul)
                                    # | glmc (glmc's TVM kernels) | auto (glmc where it runs, else nbits)
    int4_matmul: str = "auto"       # cpu int4 linears: nbits (MatMulNBits) | glmc (glmc's TVM kernels) | auto
    fp32_matmul: str = "auto"       # cpu linears of an unquantized fp32 build: onnxruntime (MatMul) | glmc
                                    # (glmc's TVM kernels, backends/cpu/linear16.py) | auto
    auto: tuple = ()                # the matmul fields compiler.resolve_matmuls chose (a lowering that cannot
                                    # use glmc's kernels falls back to nbits there instead of refusing)

    @property
    def bits(self) -> int:
        return {"int4": 4, "int8": 8}.get(self.mode, 0)


class WeightMemo:
    """A memo of pure per-weight computations (quantization), keyed by weight digest, shared
    by the entry points of one compile so each weight is processed once. It holds results,
    not configuration: a pass gives the same answer with an empty memo."""

    def __init__(self):
        self._values: dict = {}

    def get(self, key, compute):
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]


@dataclass(frozen=True)
class PassContext:
    """What a pass may know about the compile. Frozen: a pass reports through PassResult."""

    target: Target = Target("cpu")
    dtype: str = "fp32"
    quant: QuantConfig = QuantConfig()
    max_seq_len: int = 2048
    entry: str = "prefill"                  # which entry point's graph: prefill | decode | extend | score
    fuse: bool = True
    stop_before: str | None = None          # a phase name: run the pipeline up to it
    model_config: Mapping = field(default_factory=lambda: MappingProxyType({}))
    calibration: Mapping = field(default_factory=lambda: MappingProxyType({}))   # weight digest -> rows
    memo: WeightMemo = field(default_factory=WeightMemo, compare=False)
    # which constants are recipes over the checkpoint (glmc/weights.py); eager outside compile
    weights: WeightBook = field(default_factory=WeightBook, compare=False)
    lora_slots: tuple | None = None         # (slots, rank): decoder linears take run-time adapters

    def for_entry(self, entry: str) -> "PassContext":
        """The same context, for the graph of another entry point (shares the memo)."""
        return replace(self, entry=entry)

    def with_(self, **changes) -> "PassContext":
        return replace(self, **changes)


def make_context(target: str | Target = "cpu", dtype: str | None = None, quant: QuantConfig | None = None,
                 max_seq_len: int = 2048, entry: str = "prefill", fuse: bool = True, model_config: dict | None = None,
                 calibration: dict | None = None, stop_before: str | None = None,
                 weights: WeightBook | None = None, lora_slots: tuple | None = None) -> PassContext:
    """The one way compile, inspect, calibration and tests build a PassContext."""
    from glmc.backends import get_backend

    target = Target.parse(target)
    if entry not in ENTRIES:
        raise ValueError(f"entry must be one of {ENTRIES}, got {entry!r}")
    return PassContext(
        target=target,
        dtype=dtype or get_backend(target).default_dtype,
        quant=quant or QuantConfig(),
        max_seq_len=max_seq_len,
        entry=entry,
        fuse=fuse,
        stop_before=stop_before,
        model_config=MappingProxyType(dict(model_config or {})),
        calibration=MappingProxyType(dict(calibration or {})),
        weights=weights if weights is not None else WeightBook(),
        lora_slots=lora_slots,
    )


@dataclass
class PassResult:
    """The (possibly new) graph module, how many sites the pass rewrote, and what it wants
    reported (e.g. quantize_weights' per-layer errors), merged into the compile report."""

    gm: torch.fx.GraphModule
    matches: int
    report: dict = field(default_factory=dict)


def replace_with_input(node: torch.fx.Node, source: torch.fx.Node) -> None:
    node.replace_all_uses_with(source)
    node.graph.erase_node(node)
