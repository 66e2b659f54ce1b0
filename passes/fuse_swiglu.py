"""Fuse the SwiGLU activation into glmc::swiglu.

before:  g, u = chunk(linear(x, W_gate_up), 2, -1);  y = u * silu(g)         (packed, glm)
         y = silu(linear(x, Wg)) * linear(x, Wu)                            (two linears)
after:   y = glmc.swiglu(linear(x, W_gate_up))     W_gate_up = cat[Wg; Wu] packed at compile time
declines: a chunk or silu whose result has other users; non-constant weights;
biased projections in the two-linear form.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

from glmc.ir import PassContext, PassResult
from glmc.match import (
    add_constant,
    aten,
    attr_tensor,
    finish,
    is_op,
    other,
    replace,
    val,
)
from glmc.ops import swiglu  # noqa: F401  (registers torch.ops.glmc)


def _packed(silu, mul):
    """silu(getitem(chunk(p, 2, -1), 0)) * getitem(same chunk, 1) -> p."""
    g = silu.args[0]
    if not is_op(g, operator.getitem) or g.args[1] != 0:
        return None
    chunk = g.args[0]
    if not is_op(chunk, aten.chunk.default) or chunk.args[1] != 2 or chunk.args[2] not in (-1, len(val(chunk.args[0]).shape) - 1):
        return None
    up = other(mul.args, silu)
    if not (is_op(up, operator.getitem) and up.args[0] is chunk and up.args[1] == 1):
        return None
    if len(chunk.users) != 2 or len(g.users) != 1 or len(up.users) != 1:
        return None
    return chunk.args[0]


def _split(gm, silu, mul):
    """silu(linear(x, Wg)) * linear(x, Wu) -> (x, Wg, Wu)."""
    gate, up = silu.args[0], other(mul.args, silu)
    if not (is_op(gate, aten.linear.default) and is_op(up, aten.linear.default)) or gate.args[0] is not up.args[0]:
        return None
    if any(len(n.args) > 2 and n.args[2] is not None for n in (gate, up)) or len(gate.users) != 1 or len(up.users) != 1:
        return None
    wg, wu = attr_tensor(gm, gate.args[1]), attr_tensor(gm, up.args[1])
    if wg is None or wu is None or wg.shape != wu.shape:
        return None
    return gate.args[0], wg, wu


def fuse_swiglu(gm: GraphModule, ctx: PassContext) -> PassResult:
    matches = 0
    graph = gm.graph
    for silu in [n for n in graph.nodes if is_op(n, aten.silu.default)]:
        if len(silu.users) != 1:
            continue
        mul = next(iter(silu.users))
        if not is_op(mul, aten.mul.Tensor):
            continue
        packed = _packed(silu, mul)
        if packed is None:
            split = _split(gm, silu, mul)
            if split is None:
                continue
            x, wg, wu = split
            w_node = add_constant(gm, "fused_gate_up_weight", torch.cat([wg, wu], 0))
            with graph.inserting_before(mul):
                packed = graph.call_function(aten.linear.default, (x, w_node, None))
            xv = val(x)
            if xv is not None:
                packed.meta["val"] = xv.new_empty((*xv.shape[:-1], 2 * wg.shape[0]))
        with graph.inserting_before(mul):
            fused = graph.call_function(torch.ops.glmc.swiglu.default, (packed,))
        replace(mul, fused)
        matches += 1
    return finish(gm, matches)
