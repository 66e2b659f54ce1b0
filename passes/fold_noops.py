"""Remove ATen ops that compute nothing at inference time.

before:  y = dropout(x, p=0.0, train=False); z = alias(y); w = to(z, float32)  # z already fp32
after:   uses of y, z and w read x
Also drops `_assert_tensor_metadata` checks left by torch.export (they guard the
trace, not the computation), `lift_fresh_copy` of constants nobody mutates, and
full-range slices, and empty operands of `cat` (transformers' cache starts from an empty tensor, so
each decode step traced `cat([empty, past])`: a full copy of the KV cache).
declines: dropout in training mode with p > 0; a dtype cast that changes dtype.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from glmc.ir import PassContext, PassResult, replace_with_input

aten = torch.ops.aten

_IDENTITY = {aten.alias.default, aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default,
             aten.clone.default, aten.contiguous.default}
_CHECKS = {aten._assert_tensor_metadata.default}


def _is_noop_cast(node: torch.fx.Node) -> bool:
    if node.target not in (aten.to.dtype, aten._to_copy.default):
        return False
    src, out = node.args[0], node.meta.get("val")
    src_val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    if out is None or src_val is None:
        return False
    extra = {k for k in node.kwargs if k not in ("dtype",)}
    return not extra and out.dtype == src_val.dtype


def _is_full_slice(node: torch.fx.Node) -> bool:
    """x[..., 0:MAX:1] along one dim (torch.export writes `K[:, :, None]` that way under dynamic shapes)."""
    if node.target != aten.slice.Tensor:
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    start = node.kwargs.get("start", args[2])
    end = node.kwargs.get("end", args[3])
    step = node.kwargs.get("step", args[4] if args[4] is not None else 1)
    return start in (None, 0) and step == 1 and (end is None or (isinstance(end, int) and end >= 2**62))


def _is_noop_dropout(node: torch.fx.Node) -> bool:
    if node.target != aten.dropout.default:
        return False
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return p == 0.0 or train is False


def _shape(gm: GraphModule, node) -> tuple | None:
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part, None)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _fold_empty_cat(gm: GraphModule, node: torch.fx.Node) -> bool:
    """cat([empty, x], dim) -> x when every other operand has size 0 along dim."""
    if node.target != aten.cat.default:
        return False
    inputs = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    keep = []
    for x in inputs:
        shape = _shape(gm, x)
        if shape is None:
            return False
        d = dim if dim >= 0 else len(shape) + dim
        if not (shape == (0,) or (0 <= d < len(shape) and shape[d] == 0)):
            keep.append(x)
    if len(keep) != 1:
        return False
    replace_with_input(node, keep[0])
    return True


def fold_noops(gm: GraphModule, ctx: PassContext) -> PassResult:
    matches = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _CHECKS:
            gm.graph.erase_node(node)
            matches += 1
        elif node.target in _IDENTITY or _is_noop_dropout(node) or _is_noop_cast(node) or _is_full_slice(node):
            replace_with_input(node, node.args[0])
            matches += 1
        elif _fold_empty_cat(gm, node):
            matches += 1
    if matches:
        gm.recompile()
    return PassResult(gm, matches)
