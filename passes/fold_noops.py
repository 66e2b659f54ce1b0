"""Remove ATen ops that compute nothing at inference time.

before:  y = dropout(x, p=0.0, train=False); z = alias(y); w = to(z, float32)  # z already fp32
after:   uses of y, z and w read x
Also drops `_assert_tensor_metadata` checks left by torch.export (they guard the
trace, not the computation), `lift_fresh_copy` of constants nobody mutates,
full-range slices, and empty operands of `cat` (transformers' cache starts from an empty tensor, so
each decode step traced `cat([empty, past])`: a full copy of the KV cache).
declines: dropout in training mode with p > 0; a dtype cast that changes dtype or
carries other keyword arguments; a slice with a start, step or bounded end; a cat
with two or more non-empty operands.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from glmc.ir import PassContext, replace_with_input
from glmc.match import arg, attr_tensor, shape
from glmc.rewrite import Rule, rewrite

aten = torch.ops.aten
_BIG = 2**62

IDENTITY = (aten.alias.default, aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default,
            aten.clone.default, aten.contiguous.default)
CHECKS = (aten._assert_tensor_metadata.default,)
CASTS = (aten.to.dtype, aten._to_copy.default)


def _first_input(gm, node, ctx):
    return node if isinstance(arg(node, 0), Node) else None


def _noop_dropout(gm, node, ctx):
    p, train = arg(node, 1, "p", 0.5), arg(node, 2, "train", True)
    return node if isinstance(arg(node, 0), Node) and (p == 0.0 or train is False) else None


def _noop_cast(gm, node, ctx):
    src = arg(node, 0)
    out, src_val = node.meta.get("val"), src.meta.get("val") if isinstance(src, Node) else None
    if out is None or src_val is None or any(k != "dtype" for k in node.kwargs):
        return None
    return node if out.dtype == src_val.dtype else None


def _full_slice(gm, node, ctx):
    """x[..., 0:MAX:1] along one dim (torch.export writes `K[:, :, None]` that way under dynamic shapes)."""
    start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
    step = 1 if step is None else step
    full = start in (None, 0) and step == 1 and (end is None or (isinstance(end, int) and end >= _BIG))
    return node if full and isinstance(arg(node, 0), Node) else None


def _shape_of(gm, node) -> tuple | None:
    if isinstance(node, Node) and node.op == "get_attr":
        t = attr_tensor(gm, node)
        return tuple(t.shape) if t is not None else None
    return shape(node)


def _empty_cat(gm, node, ctx):
    """cat([empty, x], dim) -> (node, x) when every other operand has size 0 along dim."""
    inputs, dim = arg(node, 0), arg(node, 1, "dim", 0)
    if not isinstance(inputs, (list, tuple)) or not isinstance(dim, int):
        return None
    keep = []
    for x in inputs:
        s = _shape_of(gm, x)
        if s is None:
            return None
        d = dim if dim >= 0 else len(s) + dim
        if not (s == (0,) or (0 <= d < len(s) and s[d] == 0)):
            keep.append(x)
    return (node, keep[0]) if len(keep) == 1 else None


def _drop(gm, node, ctx):
    gm.graph.erase_node(node)


def _bypass(gm, node, ctx):
    replace_with_input(node, node.args[0])


def _bypass_cat(gm, m, ctx):
    node, kept = m
    replace_with_input(node, kept)


RULES = (
    Rule(CHECKS, lambda gm, n, ctx: n, _drop),
    Rule(IDENTITY, _first_input, _bypass),
    Rule((aten.dropout.default,), _noop_dropout, _bypass),
    Rule(CASTS, _noop_cast, _bypass),
    Rule((aten.slice.Tensor,), _full_slice, _bypass),
    Rule((aten.cat.default,), _empty_cat, _bypass_cat),
)


def fold_noops(gm: GraphModule, ctx: PassContext):
    return rewrite(gm, ctx, *RULES, dce=False)
