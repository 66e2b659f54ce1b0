"""Near-miss graphs: one small change to a real traced graph (or a tiny module) that a
pass's docstring says it declines. Each helper edits one site and returns the graph."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten


def nodes(gm: GraphModule, *targets) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def set_arg(node: Node, i: int, value) -> None:
    args = list(node.args)
    args[i] = value
    node.args = tuple(args)


def keep_alive(gm: GraphModule, node: Node) -> None:
    """Give node one more user: the graph's output returns it too."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out.args[0]
    out.args = ((*outs, node),) if isinstance(outs, (tuple, list)) else ((outs, node),)
    gm.recompile()


def non_constant(gm: GraphModule, attr_node: Node) -> Node:
    """Route every use of a constant through a clone: no longer a plain get_attr."""
    with gm.graph.inserting_after(attr_node):
        cl = gm.graph.call_function(aten.clone.default, (attr_node,))
    attr_node.replace_all_uses_with(cl, delete_user_cb=lambda u: u is not cl)
    gm.recompile()
    return cl


def fresh_input_like(gm: GraphModule, node: Node) -> Node:
    """A node computing the same value as `node` but not `node` itself (x * 1.0)."""
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(aten.mul.Tensor, (node, 1.0))
    new.meta["val"] = node.meta.get("val")
    return new
