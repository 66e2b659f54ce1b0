"""Fuse scaled-dot-product attention (with the KV cache concat and the grouped-query
head repeat) into glmc::attention, softmax always in fp32.

before:  K = cat(past_k, k);  Kr = reshape(expand(K[:, :, None], [B, Hkv, rep, S, D]), [B, H, S, D])
         p = softmax(q @ Kr^T * scale + mask, -1, dtype=fp32).to(q.dtype);  o = p @ Vr
after:   o = glmc.attention(q, k, v, mask, scale, past_k, past_v)
The fused op never materialises the repeated heads nor the concatenated cache.
declines: no additive mask; K and V with different cache structure; softmax not
over the last dim; a scale applied anywhere but after q @ K^T; a softmax with other
users; q/k/mask not 4-D or heads not a multiple of the KV heads.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import glmc.ops  # noqa: F401  (registers torch.ops.glmc)
from glmc.ir import PassContext
from glmc.match import arg, aten, is_op, only_user, replace, scalar, strip_casts, val
from glmc.rewrite import Rule, rewrite


def _unrepeat(node):
    """reshape(expand(unsqueeze(K, 2), ...), ...) -> K; anything else is taken as K itself."""
    if is_op(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        ex = arg(node, 0)
        un = arg(ex, 0)
        if is_op(ex, aten.expand.default) and is_op(un, aten.unsqueeze.default) and arg(un, 1) == 2:
            return arg(un, 0)
    return node


def _uncache(node):
    """cat([past, new], -2) -> (past, new); else (None, node)."""
    parts = arg(node, 0)
    if is_op(node, aten.cat.default) and isinstance(parts, (list, tuple)) and len(parts) == 2 \
            and arg(node, 1, "dim", 0) in (-2, 2):
        return parts[0], parts[1]
    return None, node


def _match(gm: GraphModule, sm, ctx: PassContext):
    if arg(sm, 1, "dim") not in (-1, 3):
        return None
    add = arg(sm, 0)
    if not is_op(add, aten.add.Tensor) or len(add.args) != 2:
        return None
    mul, mask = add.args
    if not is_op(mul, aten.mul.Tensor):
        mul, mask = mask, mul
    if not is_op(mul, aten.mul.Tensor) or scalar(arg(mul, 1)) is None:
        return None
    scale, qk = scalar(arg(mul, 1)), arg(mul, 0)
    if not is_op(qk, aten.matmul.default) or len(qk.args) != 2:
        return None
    q, kt = qk.args
    if not (is_op(kt, aten.transpose.int) and sorted(kt.args[1:]) in ([2, 3], [-2, -1])):
        return None
    pv = only_user(sm)
    while is_op(pv, aten.to.dtype, aten._to_copy.default) and only_user(pv) is not None:
        pv = only_user(pv)
    if not (is_op(pv, aten.matmul.default) and strip_casts(arg(pv, 0)) is sm):
        return None
    past_k, k = _uncache(_unrepeat(arg(kt, 0)))
    past_v, v = _uncache(_unrepeat(arg(pv, 1)))
    if (past_k is None) != (past_v is None):
        return None
    qv, kv, mv = val(q), val(k), val(mask)
    if qv is None or kv is None or mv is None or qv.dim() != 4 or kv.dim() != 4 or mv.dim() != 4:
        return None
    if qv.shape[1] % kv.shape[1]:
        return None
    return q, k, v, mask, scale, past_k, past_v, pv


def _replace(gm: GraphModule, m, ctx: PassContext) -> None:
    q, k, v, mask, scale, past_k, past_v, out = m
    with gm.graph.inserting_before(out):
        fused = gm.graph.call_function(torch.ops.glmc.attention.default, (q, k, v, mask, scale, past_k, past_v))
    replace(out, fused)


RULE = Rule((aten.softmax.int, aten._softmax.default), _match, _replace)


def fuse_attention(gm: GraphModule, ctx: PassContext):
    return rewrite(gm, ctx, RULE)
