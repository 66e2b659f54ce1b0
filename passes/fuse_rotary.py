"""Fuse GLM's interleaved, partial rotary embedding into glmc::rotary with folded tables.

before:  freqs = pos[..., None].float() * inv_freq;  emb = cat(freqs, freqs);  c = cos(emb) * s
         c_i = repeat_interleave(c[..., :R/2], 2)          (likewise sin)
         xr, xp = x[..., :R], x[..., R:]
         y = cat(xr * c_i + stack(-xr[..., 1::2], xr[..., 0::2]).flatten(-2) * s_i, xp)
after:   y = glmc.rotary(x, pos, COS, SIN)     COS/SIN: (max_seq_len, R/2) constants
The cos/sin subgraph becomes dead once both q and k are rewritten.
declines: non-interleaved (rotate_half by halves) layouts; inv_freq not a constant;
positions not traceable to a (B, T) tensor; no max_seq_len in the context.
"""

from __future__ import annotations

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
    scalar,
    strip_casts,
    val,
)
from glmc.ops import rotary  # noqa: F401  (registers torch.ops.glmc)

_BIG = 2**62


def _even_odd(stack, xr):
    """stack([-xr[..., 1::2], xr[..., 0::2]], -1) ?"""
    if not is_op(stack, aten.stack.default) or stack.args[1] != -1 or len(stack.args[0]) != 2:
        return False
    neg, even = stack.args[0]
    if not is_op(neg, aten.neg.default):
        return False
    odd = neg.args[0]
    for node, start in ((odd, 1), (even, 0)):
        if not (is_op(node, aten.slice.Tensor) and node.args[0] is xr and node.args[1] in (-1, 3)
                and node.args[2] == start and len(node.args) > 4 and node.args[4] == 2):
            return False
    return True


def _table_source(c_i):
    """repeat_interleave(slice(unsqueeze(C, 1), -1, 0, R/2), 2, -1) -> (C, R/2)."""
    if not is_op(c_i, aten.repeat_interleave.self_int) or c_i.args[1] != 2:
        return None
    sl = c_i.args[0]
    if not (is_op(sl, aten.slice.Tensor) and sl.args[1] in (-1, 3) and sl.args[2] == 0):
        return None
    un = sl.args[0]
    if not is_op(un, aten.unsqueeze.default):
        return None
    return un.args[0], sl.args[3]


def _angles(gm, c, fn):
    """c = fn(cat(f, f)) [* s]; f = pos[..., None].float() * inv_freq -> (pos, inv_freq, s)."""
    s = 1.0
    if is_op(c, aten.mul.Tensor) and scalar(c.args[1]) is not None:
        c, s = c.args[0], scalar(c.args[1])
    if not is_op(c, fn):
        return None
    cat = c.args[0]
    if not (is_op(cat, aten.cat.default) and len(cat.args[0]) == 2 and cat.args[0][0] is cat.args[0][1]):
        return None
    f = cat.args[0][0]
    if not is_op(f, aten.mul.Tensor):
        return None
    for a, b in (f.args, f.args[::-1]):
        inv = attr_tensor(gm, b)
        if inv is None or inv.dim() != 1:
            continue
        p = strip_casts(a)
        if is_op(p, aten.unsqueeze.default) and p.args[1] in (-1, 2):
            pos = p.args[0]
            pv = val(pos)
            if pv is not None and pv.dim() == 2:
                return pos, inv, s
    return None


def _match(gm, add):
    """add = xr * c_i + rot_half(xr) * s_i -> (x, R, pos, inv_freq, scale, out_node) or None."""
    if len(add.args) != 2 or not all(is_op(a, aten.mul.Tensor) for a in add.args):
        return None
    for m_cos, m_sin in (add.args, add.args[::-1]):
        flat = next((a for a in m_sin.args if is_op(a, aten.flatten.using_ints)), None)
        if flat is None:
            continue
        s_i = other(m_sin.args, flat)
        stack = flat.args[0]
        xr = next((a for a in m_cos.args if is_op(stack, aten.stack.default) and _even_odd(stack, a)), None)
        if xr is None:
            continue
        c_i = other(m_cos.args, xr)
        cos_src, sin_src = _table_source(c_i), _table_source(s_i)
        if cos_src is None or sin_src is None:
            return None
        cos_ang, sin_ang = _angles(gm, cos_src[0], aten.cos.default), _angles(gm, sin_src[0], aten.sin.default)
        if cos_ang is None or sin_ang is None or cos_ang[0] is not sin_ang[0]:
            return None
        pos, inv, scale = cos_ang
        R = 2 * inv.shape[0]
        x, out = xr, add
        if is_op(xr, aten.slice.Tensor) and xr.args[1] in (-1, 3) and xr.args[2] == 0 and xr.args[3] == R:
            x = xr.args[0]
            users = list(add.users)
            if len(users) == 1 and is_op(users[0], aten.cat.default) and users[0].args[0][0] is add:
                rest = users[0].args[0][1]
                if is_op(rest, aten.slice.Tensor) and rest.args[0] is x and rest.args[2] == R:
                    out = users[0]
                else:
                    return None
            elif val(x) is not None and val(x).shape[-1] != R:
                return None
        return x, R, pos, inv, scale, out
    return None


def fuse_rotary(gm: GraphModule, ctx: PassContext) -> PassResult:
    max_pos = ctx.options.get("max_seq_len")
    if not max_pos:
        return PassResult(gm, 0)
    matches = 0
    tables: dict[tuple, tuple] = {}
    graph = gm.graph
    for add in [n for n in graph.nodes if is_op(n, aten.add.Tensor)]:
        m = _match(gm, add)
        if m is None:
            continue
        x, R, pos, inv, scale, out = m
        key = (inv.data_ptr(), scale)
        if key not in tables:
            # the same fp32 arithmetic transformers uses, evaluated once for every position
            ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv.float()[None, :]
            tables[key] = (add_constant(gm, "rotary_cos", torch.cos(ang) * scale),
                           add_constant(gm, "rotary_sin", torch.sin(ang) * scale))
        cos_t, sin_t = tables[key]
        with graph.inserting_before(out):
            fused = graph.call_function(torch.ops.glmc.rotary.default, (x, pos, cos_t, sin_t))
        replace(out, fused)
        matches += 1
    return finish(gm, matches)
