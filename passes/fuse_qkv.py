"""Fuse the linear projections that read the same input (q, k, v) into one matmul.

before:  q = linear(x, Wq, bq);  k = linear(x, Wk, bk);  v = linear(x, Wv, bv)
after:   qkv = linear(x, cat[Wq; Wk; Wv], cat[bq; bk; bv]);  q, k, v = split(qkv, [Nq, Nk, Nv], -1)
The weights are concatenated once, at compile time. A projection without bias
gets zeros when its siblings have one.
declines: fewer than two linears on the input; a weight that is not a constant;
weights of different K or dtype.
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule

from glmc.ir import PassContext
from glmc.match import add_constant, arg, aten, attr_tensor, is_op, val
from glmc.rewrite import Rule, rewrite
from glmc.weights import Cat, Zeros


def _siblings(gm: GraphModule, x):
    group = []
    for u in x.users:
        if is_op(u, aten.linear.default) and arg(u, 0) is x:
            w = attr_tensor(gm, arg(u, 1))
            b_node = arg(u, 2, "bias")
            b = attr_tensor(gm, b_node) if b_node is not None else None
            if w is None or w.dim() != 2 or (b_node is not None and b is None):
                continue
            group.append((u, w, b))
    if len(group) < 2 or len({(w.shape[1], w.dtype) for _, w, _ in group}) != 1:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(group, key=lambda g: order[g[0]])


def _match(gm: GraphModule, lin, ctx: PassContext):
    """The sibling group of lin's input, when lin is its first member (each group matches once)."""
    x = arg(lin, 0)
    group = _siblings(gm, x) if x is not None else None
    return (x, group) if group is not None and group[0][0] is lin else None


def _replace(gm: GraphModule, m, ctx: PassContext) -> None:
    x, group = m
    book = ctx.weights
    weight = book.cat([w for _, w, _ in group])
    bias = None
    if any(b is not None for _, _, b in group):
        bias = book.value(Cat(tuple(book.recipe(b) if b is not None else Zeros((w.shape[0],), w.dtype)
                                    for _, w, b in group)))
    sizes = [w.shape[0] for _, w, _ in group]
    graph = gm.graph
    # named after the first projection's weight, so reports still say which layer it is
    first_w = group[0][0].args[1]
    base = first_w.target if first_w.op == "get_attr" else "fused"
    w_node = add_constant(gm, f"{base}_qkv", weight)
    b_node = add_constant(gm, f"{base}_qkv_bias", bias) if bias is not None else None
    first = group[0][0]
    with graph.inserting_before(first):
        fused = graph.call_function(aten.linear.default, (x, w_node, b_node))
        parts = graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
    xv = val(x)
    if xv is not None:
        fused.meta["val"] = xv.new_empty((*xv.shape[:-1], sum(sizes)))
    pieces = []
    with graph.inserting_before(first):
        for i, (lin, _, _) in enumerate(group):
            pieces.append(graph.call_function(operator.getitem, (parts, i)))
            pieces[-1].meta["val"] = val(lin)
    for piece, (lin, _, _) in zip(pieces, group):
        lin.replace_all_uses_with(piece)
        graph.erase_node(lin)


RULE = Rule((aten.linear.default,), _match, _replace)


def fuse_qkv(gm: GraphModule, ctx: PassContext):
    return rewrite(gm, ctx, RULE)
