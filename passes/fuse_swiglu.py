"""Fuse the SwiGLU activation into glmc::swiglu.

before:  g, u = chunk(linear(x, W_gate_up), 2, -1);  y = u * silu(g)         (packed, glm)
         y = silu(linear(x, Wg)) * linear(x, Wu)                            (two linears)
after:   y = glmc.swiglu(linear(x, W_gate_up))     W_gate_up = cat[Wg; Wu] packed at compile time
declines: a chunk or activation whose result has other users; a chunk not in two
along the last dim (-1); non-constant weights; biased projections in the two-linear
form; gate and up reading different inputs.

The packed form is a Pattern (torch.fx's subgraph rewriter); the two-linear form is a
Rule, because packing the weights makes a new constant. `gated_mlp` builds both for any
activation: fuse_gelu_mlp uses it with gelu and glmc::geglu.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import glmc.ops  # noqa: F401  (registers torch.ops.glmc)
from glmc.ir import PassContext
from glmc.match import add_constant, arg, aten, attr_tensor, is_op, only_user, other, replace, val
from glmc.rewrite import Pattern, Rule, rewrite


def _split(gm, act, ctx):
    """act(linear(x, Wg)) * linear(x, Wu) -> (mul, x, Wg, Wu)."""
    mul = only_user(act)
    if not is_op(mul, aten.mul.Tensor) or len(mul.args) != 2:
        return None
    gate, up = arg(act, 0), other(mul.args, act)
    if not (is_op(gate, aten.linear.default) and is_op(up, aten.linear.default)) or arg(gate, 0) is not arg(up, 0):
        return None
    if any(arg(n, 2, "bias") is not None for n in (gate, up)) or len(gate.users) != 1 or len(up.users) != 1:
        return None
    wg, wu = attr_tensor(gm, arg(gate, 1)), attr_tensor(gm, arg(up, 1))
    if wg is None or wu is None or wg.shape != wu.shape:
        return None
    return act, mul, arg(gate, 0), wg, wu


def _pack(gm: GraphModule, m, ctx: PassContext, fused_op, fused_args: tuple) -> None:
    act, mul, x, wg, wu = m
    graph = gm.graph
    w_node = add_constant(gm, "fused_gate_up_weight", ctx.weights.cat([wg, wu]))
    with graph.inserting_before(mul):
        packed = graph.call_function(aten.linear.default, (x, w_node, None))
        fused = graph.call_function(fused_op, (packed, *fused_args))
    xv = val(x)
    if xv is not None:
        packed.meta["val"] = xv.new_empty((*xv.shape[:-1], 2 * wg.shape[0]))
    replace(mul, fused)


def gated_mlp(act_op, act_kwargs: dict, fused_op, fused_args: tuple = ()) -> tuple:
    """The rewrites of `up * act(gate)` (act = act_op with exactly act_kwargs, as torch.export
    writes it) into fused_op(gate_up, *fused_args): the packed form in both operand orders
    (Patterns) and the two-linear form (a Rule anchored on act_op)."""

    def up_first(gate_up):
        parts = aten.chunk.default(gate_up, 2, -1)
        return aten.mul.Tensor(parts[1], act_op(parts[0], **act_kwargs))

    def act_first(gate_up):
        parts = aten.chunk.default(gate_up, 2, -1)
        return aten.mul.Tensor(act_op(parts[0], **act_kwargs), parts[1])

    def replacement(gate_up):
        return fused_op(gate_up, *fused_args)

    def two_linears(gm, node, ctx):
        return _split(gm, node, ctx) if dict(node.kwargs) == act_kwargs else None

    return (Pattern(up_first, replacement), Pattern(act_first, replacement),
            Rule((act_op,), two_linears, lambda gm, m, ctx: _pack(gm, m, ctx, fused_op, fused_args)))


def fuse_swiglu(gm: GraphModule, ctx: PassContext):
    return rewrite(gm, ctx, *gated_mlp(aten.silu.default, {}, torch.ops.glmc.swiglu.default))
