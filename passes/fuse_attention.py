"""Fuse scaled-dot-product attention (with the KV cache concat and the grouped-query
head repeat) into glmc::attention, softmax always in fp32.

before:  K = cat(past_k, k);  Kr = reshape(expand(K[:, :, None], [B, Hkv, rep, S, D]), [B, H, S, D])
         p = softmax(q @ Kr^T * scale + mask, -1, dtype=fp32).to(q.dtype);  o = p @ Vr
after:   o = glmc.attention(q, k, v, mask, scale, past_k, past_v)
The fused op never materialises the repeated heads nor the concatenated cache.
declines: no additive mask; K and V with different cache structure; softmax not
over the last dim; a scale applied anywhere but after q @ K^T.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from glmc.ir import PassContext, PassResult
from glmc.match import aten, finish, is_op, replace, scalar, strip_casts, val
from glmc.ops import attention  # noqa: F401  (registers torch.ops.glmc)


def _unrepeat(node):
    """reshape(expand(unsqueeze(K, 2), ...), ...) -> K; anything else is taken as K itself."""
    if is_op(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        ex = node.args[0]
        if is_op(ex, aten.expand.default) and is_op(ex.args[0], aten.unsqueeze.default) and ex.args[0].args[1] == 2:
            return ex.args[0].args[0]
    return node


def _uncache(node):
    """cat([past, new], -2) -> (past, new); else (None, node)."""
    if is_op(node, aten.cat.default) and len(node.args[0]) == 2 and node.args[1] in (-2, 2):
        return node.args[0][0], node.args[0][1]
    return None, node


def _match(sm):
    if sm.args[1] not in (-1, 3):
        return None
    add = sm.args[0]
    if not is_op(add, aten.add.Tensor):
        return None
    mul, mask = add.args
    if not is_op(mul, aten.mul.Tensor):
        mul, mask = mask, mul
    if not is_op(mul, aten.mul.Tensor) or scalar(mul.args[1]) is None:
        return None
    scale, qk = scalar(mul.args[1]), mul.args[0]
    if not is_op(qk, aten.matmul.default):
        return None
    q, kt = qk.args
    if not (is_op(kt, aten.transpose.int) and sorted(kt.args[1:]) in ([2, 3], [-2, -1])):
        return None
    users = list(sm.users)
    if len(users) != 1:
        return None
    pv = users[0]
    while is_op(pv, aten.to.dtype, aten._to_copy.default) and len(pv.users) == 1:
        pv = next(iter(pv.users))
    if not (is_op(pv, aten.matmul.default) and strip_casts(pv.args[0]) is sm):
        return None
    past_k, k = _uncache(_unrepeat(kt.args[0]))
    past_v, v = _uncache(_unrepeat(pv.args[1]))
    if (past_k is None) != (past_v is None):
        return None
    qv, kv, mv = val(q), val(k), val(mask)
    if qv is None or kv is None or mv is None or qv.dim() != 4 or kv.dim() != 4 or mv.dim() != 4:
        return None
    if qv.shape[1] % kv.shape[1]:
        return None
    return q, k, v, mask, scale, past_k, past_v, pv


def fuse_attention(gm: GraphModule, ctx: PassContext) -> PassResult:
    matches = 0
    graph = gm.graph
    for sm in [n for n in graph.nodes if is_op(n, aten.softmax.int, aten._softmax.default)]:
        m = _match(sm)
        if m is None:
            continue
        q, k, v, mask, scale, past_k, past_v, out = m
        with graph.inserting_before(out):
            fused = graph.call_function(torch.ops.glmc.attention.default, (q, k, v, mask, scale, past_k, past_v))
        replace(out, fused)
        matches += 1
    return finish(gm, matches)
