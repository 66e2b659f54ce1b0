"""Fuse a residual add followed by RMSNorm into glmc::add_rms_norm (and a lone
RMSNorm into glmc::rms_norm).

before:  h = x + r;  s = rsqrt(mean(h^2, -1) + eps);  y = w * (h * s)
after:   y, h = glmc.add_rms_norm(x, r, w, eps)          (getitem 0 / 1)
         y = glmc.rms_norm(h, w, eps)                      when h is not an add
Casts to fp32 around the statistics (fp16/bf16 graphs) are matched through.
declines: w not a constant vector; eps not a scalar; the mean not over the last
dim with keepdim; h an add of a tensor and a scalar.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

from glmc.ir import PassContext, PassResult
from glmc.match import aten, attr_tensor, finish, is_op, other, scalar, strip_casts, val
from glmc.ops import add_rms_norm, rms_norm  # noqa: F401  (registers torch.ops.glmc)


def _match(gm: GraphModule, rs):
    """rs = rsqrt(add(mean(pow(h, 2), [-1], True), eps)) -> (h, eps, y, w) or None."""
    add = rs.args[0]
    if not is_op(add, aten.add.Tensor, aten.add.Scalar) or scalar(add.args[1]) is None:
        return None
    eps, mean = scalar(add.args[1]), add.args[0]
    if not is_op(mean, aten.mean.dim) or list(mean.args[1]) not in ([-1],) or not (
            len(mean.args) > 2 and mean.args[2]):
        return None
    pw = mean.args[0]
    if not is_op(pw, aten.pow.Tensor_Scalar) or pw.args[1] != 2:
        return None
    h32 = pw.args[0]
    h = strip_casts(h32)
    # h * rs, then (optionally cast back) times the weight
    norm = [u for u in rs.users if is_op(u, aten.mul.Tensor) and other(u.args, rs) is h32]
    if len(norm) != 1 or len(rs.users) != 1:
        return None
    cast_back = norm[0]
    while len(cast_back.users) == 1 and is_op(next(iter(cast_back.users)), *(aten.to.dtype, aten._to_copy.default)):
        cast_back = next(iter(cast_back.users))
    if len(cast_back.users) != 1:
        return None
    y = next(iter(cast_back.users))
    if not is_op(y, aten.mul.Tensor):
        return None
    w = other(y.args, cast_back)
    wt = attr_tensor(gm, w)
    hv = val(h)
    if wt is None or wt.dim() != 1 or hv is None or wt.shape[0] != hv.shape[-1]:
        return None
    return h, eps, y, w


def fuse_add_rmsnorm(gm: GraphModule, ctx: PassContext) -> PassResult:
    matches = 0
    for rs in [n for n in gm.graph.nodes if is_op(n, aten.rsqrt.default)]:
        m = _match(gm, rs)
        if m is None:
            continue
        h, eps, y, w = m
        graph = gm.graph
        is_add = (is_op(h, aten.add.Tensor) and len(h.args) == 2 and all(isinstance(a, torch.fx.Node) for a in h.args)
                  and val(h.args[0]) is not None and val(h.args[1]) is not None
                  and tuple(val(h.args[0]).shape) == tuple(val(h).shape))
        if is_add:
            with graph.inserting_after(h):
                fused = graph.call_function(torch.ops.glmc.add_rms_norm.default, (h.args[0], h.args[1], w, eps))
            with graph.inserting_after(fused):
                new_y = graph.call_function(operator.getitem, (fused, 0))
            with graph.inserting_after(new_y):
                new_h = graph.call_function(operator.getitem, (fused, 1))
            new_y.meta["val"], new_h.meta["val"] = val(y), val(h)
            y.replace_all_uses_with(new_y)
            h.replace_all_uses_with(new_h)
        else:
            with graph.inserting_after(y):
                new_y = graph.call_function(torch.ops.glmc.rms_norm.default, (h, w, eps))
            new_y.meta["val"] = val(y)
            y.replace_all_uses_with(new_y)
        matches += 1
    return finish(gm, matches)
