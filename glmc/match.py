"""Matching helpers for the matchers of glmc.rewrite rules.

A matcher returns the nodes it needs or None ("no, this is not the pattern");
it never raises on a graph it does not recognise: every accessor here answers
None (or False) for a missing argument, a non-node, or a node without a
recorded shape, instead of indexing blindly.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.to.device)


def is_op(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def strip_casts(node):
    while is_op(node, *CASTS):
        node = node.args[0]
    return node


def attr_tensor(gm: GraphModule, node) -> torch.Tensor | None:
    """The constant behind a get_attr node (through casts), else None."""
    node = strip_casts(node)
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


def arg(node, i: int, name: str | None = None, default=None):
    """Positional argument i of a call node (or keyword `name`), else `default`."""
    if not isinstance(node, Node):
        return default
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default) if name else default


def shape(node) -> tuple | None:
    """The recorded shape of a node's value, or None when it has none."""
    v = val(node)
    return tuple(v.shape) if hasattr(v, "shape") else None


def only_user(node):
    """The single user of a node, or None when it has zero or several."""
    return next(iter(node.users)) if isinstance(node, Node) and len(node.users) == 1 else None


def val(node):
    """The fake tensor torch.export recorded for a node (shape/dtype), or None."""
    return node.meta.get("val") if isinstance(node, Node) else None


def scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def add_constant(gm: GraphModule, name: str, tensor: torch.Tensor) -> Node:
    """Register `tensor` on gm under a fresh name and return a get_attr node for it."""
    base, i = name.replace(".", "_"), 0
    while hasattr(gm, f"{base}_{i}"):
        i += 1
    attr = f"{base}_{i}"
    gm.register_buffer(attr, tensor.detach().contiguous())
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        return gm.graph.get_attr(attr)


def other(pair, known):
    """Of a two-argument commutative op's args, the one that is not `known`."""
    a, b = pair
    return b if a is known else a if b is known else None


def replace(old: Node, new: Node) -> None:
    """Route every use of `old` to `new` (which computes the same value)."""
    new.meta["val"] = val(old)
    old.replace_all_uses_with(new)
