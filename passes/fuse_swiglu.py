"""Fuse the SwiGLU activation into glmc::swiglu.

before:  g, u = chunk(linear(x, W_gate_up), 2, -1);  y = u * silu(g)         (packed, glm)
         y = silu(linear(x, Wg)) * linear(x, Wu)                            (two linears)
after:   y = glmc.swiglu(linear(x, W_gate_up))     W_gate_up = cat[Wg; Wu] packed at compile time
declines: a chunk or activation whose result has other users; a chunk not in two
along the last dim; non-constant weights; biased projections in the two-linear form;
gate and up reading different inputs.

The matcher is shared by every gated MLP (`gated_mlp_rule`): fuse_gelu_mlp uses it
with gelu as the anchor and glmc::geglu as the result.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

import glmc.ops  # noqa: F401  (registers torch.ops.glmc)
from glmc.ir import PassContext
from glmc.match import add_constant, arg, aten, attr_tensor, is_op, only_user, other, replace, shape, val
from glmc.rewrite import Rule, rewrite


def _packed(act, mul):
    """act(getitem(chunk(p, 2, -1), 0)) * getitem(same chunk, 1) -> p."""
    g = arg(act, 0)
    if not is_op(g, operator.getitem) or arg(g, 1) != 0:
        return None
    chunk = arg(g, 0)
    p = arg(chunk, 0)
    ps = shape(p)
    if not is_op(chunk, aten.chunk.default) or arg(chunk, 1, "chunks") != 2 or ps is None \
            or arg(chunk, 2, "dim", 0) not in (-1, len(ps) - 1):
        return None
    up = other(mul.args, act)
    if not (is_op(up, operator.getitem) and arg(up, 0) is chunk and arg(up, 1) == 1):
        return None
    if len(chunk.users) != 2 or len(g.users) != 1 or len(up.users) != 1:
        return None
    return p


def _split(gm, act, mul):
    """act(linear(x, Wg)) * linear(x, Wu) -> (x, Wg, Wu)."""
    gate, up = arg(act, 0), other(mul.args, act)
    if not (is_op(gate, aten.linear.default) and is_op(up, aten.linear.default)) or arg(gate, 0) is not arg(up, 0):
        return None
    if any(arg(n, 2, "bias") is not None for n in (gate, up)) or len(gate.users) != 1 or len(up.users) != 1:
        return None
    wg, wu = attr_tensor(gm, arg(gate, 1)), attr_tensor(gm, arg(up, 1))
    if wg is None or wu is None or wg.shape != wu.shape:
        return None
    return arg(gate, 0), wg, wu


def _match(gm: GraphModule, act, ctx: PassContext):
    mul = only_user(act)
    if not is_op(mul, aten.mul.Tensor) or len(mul.args) != 2:
        return None
    packed = _packed(act, mul)
    if packed is not None:
        return act, mul, packed, None
    split = _split(gm, act, mul)
    return None if split is None else (act, mul, None, split)


def _replace(gm: GraphModule, m, ctx: PassContext, fused_op, extra_args) -> None:
    act, mul, packed, split = m
    graph = gm.graph
    if packed is None:
        x, wg, wu = split
        w_node = add_constant(gm, "fused_gate_up_weight", torch.cat([wg, wu], 0))
        with graph.inserting_before(mul):
            packed = graph.call_function(aten.linear.default, (x, w_node, None))
        xv = val(x)
        if xv is not None:
            packed.meta["val"] = xv.new_empty((*xv.shape[:-1], 2 * wg.shape[0]))
    with graph.inserting_before(mul):
        fused = graph.call_function(fused_op, (packed, *extra_args(act)))
    replace(mul, fused)


def gated_mlp_rule(anchor, fused_op, extra_args=lambda act: ()) -> Rule:
    """act(gate) * up at `anchor` (the activation op) -> fused_op(gate_up, *extra_args(act))."""
    return Rule((anchor,), _match, lambda gm, m, ctx: _replace(gm, m, ctx, fused_op, extra_args))


def fuse_swiglu(gm: GraphModule, ctx: PassContext):
    return rewrite(gm, ctx, gated_mlp_rule(aten.silu.default, torch.ops.glmc.swiglu.default))

