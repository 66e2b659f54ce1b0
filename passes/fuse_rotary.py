"""Fuse GLM's interleaved, partial rotary embedding into glmc::rotary with folded tables.

before:  freqs = pos[..., None].float() * inv_freq;  emb = cat(freqs, freqs);  c = cos(emb) * s
         c_i = repeat_interleave(c[..., :R/2], 2)          (likewise sin)
         xr, xp = x[..., :R], x[..., R:]
         y = cat(xr * c_i + stack(-xr[..., 1::2], xr[..., 0::2]).flatten(-2) * s_i, xp)
after:   y = glmc.rotary(x, pos, COS, SIN)     COS/SIN: (max_seq_len, R/2) constants
The cos/sin subgraph becomes dead once both q and k are rewritten.
declines: non-interleaved (rotate_half by halves) layouts; inv_freq not a constant;
positions not traceable to a (B, T) tensor; cos and sin from different positions;
a partial rotary whose pass-through half is not the rest of the same x.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.fx import GraphModule

import glmc.ops  # noqa: F401  (registers torch.ops.glmc)
from glmc.ir import PassContext
from glmc.match import CASTS, add_constant, arg, aten, attr_tensor, is_op, only_user, other, replace, scalar, shape, strip_casts
from glmc.rewrite import Rule, rewrite

def _even_odd(stack, xr):
    """stack([-xr[..., 1::2], xr[..., 0::2]], -1) ?"""
    parts = arg(stack, 0)
    if not is_op(stack, aten.stack.default) or arg(stack, 1, "dim", 0) != -1 or not isinstance(parts, (list, tuple)) \
            or len(parts) != 2:
        return False
    neg, even = parts
    if not is_op(neg, aten.neg.default):
        return False
    odd = arg(neg, 0)
    for node, start in ((odd, 1), (even, 0)):
        if not (is_op(node, aten.slice.Tensor) and arg(node, 0) is xr and arg(node, 1, "dim", 0) in (-1, 3)
                and arg(node, 2, "start") == start and arg(node, 4, "step", 1) == 2):
            return False
    return True


def _table_source(c_i):
    """repeat_interleave(slice(unsqueeze(C, 1), -1, 0, R/2), 2, -1) -> (C, R/2)."""
    if not is_op(c_i, aten.repeat_interleave.self_int) or arg(c_i, 1, "repeats") != 2:
        return None
    sl = arg(c_i, 0)
    if not (is_op(sl, aten.slice.Tensor) and arg(sl, 1, "dim", 0) in (-1, 3) and arg(sl, 2, "start") == 0):
        return None
    un = arg(sl, 0)
    if not is_op(un, aten.unsqueeze.default):
        return None
    return arg(un, 0), arg(sl, 3, "end")


def _angles(gm, c, fn):
    """c = fn(cat(f, f)) [* s]; f = pos[..., None].float() * inv_freq -> (pos, inv_freq, s)."""
    s = 1.0
    if is_op(c, aten.mul.Tensor) and scalar(arg(c, 1)) is not None:
        c, s = arg(c, 0), scalar(arg(c, 1))
    if not is_op(c, fn):
        return None
    cat = arg(c, 0)
    parts = arg(cat, 0)
    if not (is_op(cat, aten.cat.default) and isinstance(parts, (list, tuple)) and len(parts) == 2
            and parts[0] is parts[1]):
        return None
    found = _freqs(gm, parts[0])
    return None if found is None else (*found, s)


def _freqs(gm, f):
    """The angle table f (B, T, R/2) -> (pos (B, T), inv_freq), in either of transformers' forms:
    pos[..., None].float() * inv_freq, or (earlier releases)
    (inv_freq[None, :, None].float().expand(B, -1, 1) @ pos[:, None, :].float()).transpose(1, 2)."""
    if is_op(f, aten.mul.Tensor) and len(f.args) == 2:
        for a, b in (f.args, f.args[::-1]):
            inv = attr_tensor(gm, b)
            p = strip_casts(a)
            if inv is not None and inv.dim() == 1 and is_op(p, aten.unsqueeze.default) and arg(p, 1) in (-1, 2):
                return _positions(arg(p, 0), inv)
        return None
    if not (is_op(f, aten.transpose.int) and sorted(a % 3 for a in f.args[1:3]) == [1, 2]):
        return None
    mm = arg(f, 0)
    if not is_op(mm, aten.matmul.default) or len(mm.args) != 2:
        return None
    a, p = mm.args[0], strip_casts(mm.args[1])
    while is_op(a, aten.expand.default, aten.unsqueeze.default, *CASTS):
        a = a.args[0]
    inv = attr_tensor(gm, a)
    if inv is None or inv.dim() != 1 or not (is_op(p, aten.unsqueeze.default) and arg(p, 1) in (1, -2)):
        return None
    return _positions(arg(p, 0), inv)


def _positions(pos, inv):
    ps = shape(pos)
    return (pos, inv) if ps is not None and len(ps) == 2 else None


def _match(gm: GraphModule, add, ctx: PassContext):
    """add = xr * c_i + rot_half(xr) * s_i -> (x, R, pos, inv_freq, scale, out_node) or None."""
    if not ctx.max_seq_len or len(add.args) != 2 or not all(is_op(a, aten.mul.Tensor) for a in add.args):
        return None
    for m_cos, m_sin in (add.args, add.args[::-1]):
        flat = next((a for a in m_sin.args if is_op(a, aten.flatten.using_ints)), None)
        if flat is None:
            continue
        s_i = other(m_sin.args, flat)
        stack = arg(flat, 0)
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
        if is_op(xr, aten.slice.Tensor) and arg(xr, 1, "dim", 0) in (-1, 3) and arg(xr, 2, "start") == 0 \
                and arg(xr, 3, "end") == R:
            x = arg(xr, 0)
            cat = only_user(add)
            parts = arg(cat, 0)
            if is_op(cat, aten.cat.default) and isinstance(parts, (list, tuple)) and parts[0] is add:
                rest = parts[1] if len(parts) == 2 else None
                if is_op(rest, aten.slice.Tensor) and arg(rest, 0) is x and arg(rest, 2, "start") == R:
                    out = cat
                else:
                    return None
            elif shape(x) is not None and shape(x)[-1] != R:
                return None
        return x, R, pos, inv, scale, out
    return None


def _replace(gm: GraphModule, m, ctx: PassContext, tables: dict) -> None:
    x, R, pos, inv, scale, out = m
    # one pair of tables per (inv_freq, scale): q and k of every layer share them
    key = (inv.data_ptr(), scale)
    if key not in tables:
        # the same fp32 arithmetic transformers uses, evaluated once for every position
        ang = torch.arange(ctx.max_seq_len, dtype=torch.float32)[:, None] * inv.float()[None, :]
        tables[key] = (add_constant(gm, "rotary_cos", torch.cos(ang) * scale),
                       add_constant(gm, "rotary_sin", torch.sin(ang) * scale))
    cos_t, sin_t = tables[key]
    with gm.graph.inserting_before(out):
        fused = gm.graph.call_function(torch.ops.glmc.rotary.default, (x, pos, cos_t, sin_t))
    replace(out, fused)


def fuse_rotary(gm: GraphModule, ctx: PassContext):
    tables: dict = {}      # this run's folded tables, by (inv_freq, scale)
    return rewrite(gm, ctx, Rule((aten.add.Tensor,), _match, partial(_replace, tables=tables)))
