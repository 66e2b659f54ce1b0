"""Small helpers over torch.fx graphs of ATen ops."""

from __future__ import annotations

from collections import Counter

import torch


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


class PassContext:
    """What a pass may know about the compile: target, dtype, quant, options."""

    def __init__(self, target: str = "cpu", dtype: str = "fp32", quant: str = "none", **options):
        self.target = target
        self.dtype = dtype
        self.quant = quant
        self.options = options

    def for_entry(self, entry: str) -> "PassContext":
        """The same context, told which entry point (prefill, decode, score) it compiles."""
        return PassContext(self.target, self.dtype, self.quant, **dict(self.options, entry=entry))


class PassResult:
    """The (possibly new) graph module and how many sites the pass rewrote."""

    def __init__(self, gm: torch.fx.GraphModule, matches: int):
        self.gm = gm
        self.matches = matches


def replace_with_input(node: torch.fx.Node, source: torch.fx.Node) -> None:
    node.replace_all_uses_with(source)
    node.graph.erase_node(node)
