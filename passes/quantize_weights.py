"""Quantize linear weights to int8 (per output channel) or int4 (group-wise), optionally
activation-aware (per-input-channel scales searched on calibration activations, AWQ-style).

before:  y = linear(x, W, b)
after:   y = glmc.linear_nbits(x, Q, S, Z, b, K, bits, group)             round-to-nearest
         y = glmc.linear_nbits(x * (1/s), Q(W * s), ..., b, ...)          with calibration
Runs after fusion, so the packed qkv and gate_up weights quantize as one matrix.
The lm_head is quantized to int8 (group-wise int4 with ctx.quant.lm_head == "int4"), or
kept fp32 with "none". The embedding
table stays fp32 unless ctx.quant.embedding == "int8" (decode reads one row of it per
token, so int8 there saves memory and disk, not time):
         e = embedding(W, ids)  ->  e = glmc.embedding_int8(ids, Q, row_scales)
PassResult.report: per quantized weight, its bits, shape, relative error and bytes.
declines: quant "none"; non-constant or non-2-D weights; K < 16; the lm_head with
lm_head "none".
"""

from __future__ import annotations

from functools import partial

import torch
from torch.fx import GraphModule

import glmc.ops  # noqa: F401  (registers torch.ops.glmc)
from glmc.ir import PassContext, PassResult
from glmc.match import add_constant, arg, aten, attr_tensor, is_op, replace, val
from glmc.quant import EmbeddingInt8, Quantized, dequantize, digest, quantize
from glmc.rewrite import Rule, rewrite
from glmc.weights import Const

ALPHAS = [i / 10 for i in range(11)]


def _int8_block(K: int) -> int:
    """int8 is per output channel; its scale is replicated over blocks of this size. The
    largest power of two <= 128 dividing K avoids padding; 128 (with padding) otherwise."""
    for b in (128, 64, 32, 16):
        if K % b == 0:
            return b
    return 128


def _lm_head(gm: GraphModule):
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    outs = arg(out, 0)
    first = outs[0] if isinstance(outs, (tuple, list)) and outs else outs
    return first if is_op(first, aten.linear.default) else None


def search_scale(w: torch.Tensor, x: torch.Tensor, bits: int, group: int, symmetric: bool):
    """AWQ-style: s = mean|x|^alpha over a grid of alpha; keep the s whose quantized
    output is closest to the fp32 output on the calibration rows. alpha 0 is plain RTN."""
    ref = x @ w.T
    mean_abs = x.abs().mean(0).clamp_min(1e-8)
    best = (None, float("inf"), 0.0)
    for alpha in ALPHAS:
        s = mean_abs ** alpha
        s = s / (s.max() * s.min()).sqrt()
        wq = dequantize(quantize(w * s, bits, group, symmetric))
        err = float(((x / s) @ wq.T - ref).pow(2).mean())
        if err < best[1]:
            best = (s if alpha > 0 else None, err, alpha)
    return best


def _quantized(w: torch.Tensor, key, bits: int, block: int, ctx: PassContext) -> Quantized:
    """The quantization recipe of weight w (identified by `key`): round-to-nearest, or with
    calibration rows for it (int4) the activation-aware scale searched on them."""
    q = ctx.quant
    rows = ctx.calibration.get(key)
    if rows is None or bits != 4:
        return Quantized(ctx.weights.recipe(w), bits, block, q.symmetric)
    wf = w.detach().float()         # the search needs the weight in memory (--calibrate is eager)
    s, _, alpha = search_scale(wf, rows, bits, block, q.symmetric)
    return Quantized(Const(wf), bits, block, q.symmetric, act_scale=s, alpha=alpha)


def _match_embedding(gm: GraphModule, node, ctx: PassContext):
    if ctx.quant.mode == "none" or ctx.quant.embedding != "int8":
        return None
    w = attr_tensor(gm, arg(node, 0))
    return (node, w) if w is not None and w.dim() == 2 else None


def _weight_key(w: torch.Tensor, ctx: PassContext):
    """What identifies a weight across entry points: its recipe, or its content when in memory."""
    return ctx.weights.recipe(w).key if ctx.weights.is_lazy(w) else digest(w)


def _replace_embedding(gm: GraphModule, m, ctx: PassContext) -> None:
    node, w = m
    book = ctx.weights
    table = ctx.memo.get((_weight_key(w, ctx), "embedding"), lambda: EmbeddingInt8(book.recipe(w)))
    with gm.graph.inserting_before(node):
        fused = gm.graph.call_function(torch.ops.glmc.embedding_int8.default,
                                       (node.args[1], add_constant(gm, "qembedding", book.value(table.part(0))),
                                        add_constant(gm, "qembedding_scales", book.value(table.part(1)))))
    replace(node, fused)


def _match_linear(gm: GraphModule, node, ctx: PassContext, lm_head):
    if ctx.quant.mode == "none":
        return None
    w = attr_tensor(gm, arg(node, 1))
    if w is None or w.dim() != 2 or w.shape[1] < 16:
        return None
    bits = ctx.quant.bits
    if node is lm_head:
        if ctx.quant.lm_head == "none":
            return None
        bits = 4 if ctx.quant.lm_head == "int4" else 8
    return node, w, bits


def _replace_linear(gm: GraphModule, m, ctx: PassContext, report: dict) -> None:
    node, w, bits = m
    key = _weight_key(w, ctx)   # a content hash in memory: once per weight and entry point
    book, q = ctx.weights, ctx.quant
    block = q.group_size if bits == 4 else _int8_block(w.shape[1])
    multi = ctx.memo.get((key, bits), lambda: _quantized(w, key, bits, block, ctx))
    parts = [book.value(multi.part(i)) for i in range(len(multi.outputs))]
    s, row, K = multi.act_scale, multi.row, w.shape[1]
    w_node = node.args[1]
    report[w_node.target if w_node.op == "get_attr" else str(w_node)] = row
    graph = gm.graph
    x = node.args[0]
    bias = arg(node, 2, "bias")
    with graph.inserting_before(node):
        qw = add_constant(gm, "qweight", parts[0])
        sc = add_constant(gm, "qscales", parts[1])
        zp = add_constant(gm, "qzeros", parts[2]) if len(parts) > 2 else None
        if s is not None:
            inv = add_constant(gm, "act_scale_inv", (1.0 / s).to(torch.float32))
            x = graph.call_function(aten.mul.Tensor, (x, inv))
            x.meta["val"] = val(node.args[0])
        fused = graph.call_function(
            torch.ops.glmc.linear_nbits.default,
            (x, qw, sc, zp, bias, K, bits, block))
    replace(node, fused)


def quantize_weights(gm: GraphModule, ctx: PassContext) -> PassResult:
    report: dict = {}
    result = rewrite(gm, ctx,
                     Rule((aten.embedding.default,), _match_embedding, _replace_embedding),
                     Rule((aten.linear.default,), partial(_match_linear, lm_head=_lm_head(gm)),
                          partial(_replace_linear, report=report)))
    result.report = {"quantization": report} if report else {}
    return result
