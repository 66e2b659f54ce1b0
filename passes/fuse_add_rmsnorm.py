"""Fuse a residual add followed by RMSNorm into glmc::add_rms_norm (and a lone
RMSNorm into glmc::rms_norm).

before:  h = x + r;  s = rsqrt(mean(h^2, -1) + eps);  y = w * (h * s)
after:   y, h = glmc.add_rms_norm(x, r, w, eps)          (getitem 0 / 1)
         y = glmc.rms_norm(h, w, eps)                      when h is not an add
Casts to fp32 around the statistics (fp16/bf16 graphs) are matched through.
declines: w not a constant vector of the hidden size; eps not a scalar; the mean not
over the last dim with keepdim; the normalised value with other users; h an add of
a tensor and a scalar or of differently shaped tensors (then a lone rms_norm).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

import glmc.ops  # noqa: F401  (registers torch.ops.glmc)
from glmc.ir import PassContext
from glmc.match import CASTS, arg, aten, attr_tensor, is_op, only_user, other, scalar, shape, strip_casts
from glmc.rewrite import Rule, rewrite


def _match(gm: GraphModule, rs: Node, ctx: PassContext):
    """rs = rsqrt(add(mean(pow(h, 2), [-1], True), eps)) -> (h, eps, y, w, is_add) or None."""
    add = arg(rs, 0)
    if not is_op(add, aten.add.Tensor, aten.add.Scalar) or scalar(arg(add, 1)) is None:
        return None
    eps, mean = scalar(arg(add, 1)), arg(add, 0)
    if not is_op(mean, aten.mean.dim) or arg(mean, 1) not in ([-1], (-1,)) or not arg(mean, 2, "keepdim"):
        return None
    pw = arg(mean, 0)
    if not is_op(pw, aten.pow.Tensor_Scalar) or arg(pw, 1) != 2:
        return None
    h32 = arg(pw, 0)
    h = strip_casts(h32)
    # h * rs, then (optionally cast back) times the weight
    norm = only_user(rs)
    if not is_op(norm, aten.mul.Tensor) or other(norm.args, rs) is not h32:
        return None
    cast_back = norm
    while is_op(only_user(cast_back), *CASTS):
        cast_back = only_user(cast_back)
    y = only_user(cast_back)
    if not is_op(y, aten.mul.Tensor):
        return None
    w = other(y.args, cast_back)
    wt, hs = attr_tensor(gm, w), shape(h)
    if wt is None or wt.dim() != 1 or hs is None or wt.shape[0] != hs[-1]:
        return None
    is_add = (is_op(h, aten.add.Tensor) and len(h.args) == 2 and all(isinstance(a, Node) for a in h.args)
              and shape(h.args[0]) == hs and shape(h.args[1]) is not None)
    return h, eps, y, w, is_add


def _replace(gm: GraphModule, m, ctx: PassContext) -> None:
    h, eps, y, w, is_add = m
    graph = gm.graph
    if is_add:
        with graph.inserting_after(h):
            fused = graph.call_function(torch.ops.glmc.add_rms_norm.default, (h.args[0], h.args[1], w, eps))
        with graph.inserting_after(fused):
            new_y = graph.call_function(operator.getitem, (fused, 0))
        with graph.inserting_after(new_y):
            new_h = graph.call_function(operator.getitem, (fused, 1))
        new_y.meta["val"], new_h.meta["val"] = y.meta.get("val"), h.meta.get("val")
        y.replace_all_uses_with(new_y)
        h.replace_all_uses_with(new_h)
    else:
        with graph.inserting_after(y):
            new_y = graph.call_function(torch.ops.glmc.rms_norm.default, (h, w, eps))
        new_y.meta["val"] = y.meta.get("val")
        y.replace_all_uses_with(new_y)


RULE = Rule((aten.rsqrt.default,), _match, _replace)


def fuse_add_rmsnorm(gm: GraphModule, ctx: PassContext):
    return rewrite(gm, ctx, RULE)
