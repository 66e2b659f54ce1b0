"""Quantize linear weights to int8 (per output channel) or int4 (group-wise), optionally
activation-aware (per-input-channel scales searched on calibration activations, AWQ-style).

before:  y = linear(x, W, b)
after:   y = glmc.linear_nbits(x, Q, S, Z, b, K, bits, group)             round-to-nearest
         y = glmc.linear_nbits(x * (1/s), Q(W * s), ..., b, ...)          with calibration
Runs after fusion, so the packed qkv and gate_up weights quantize as one matrix.
The lm_head is quantized to int8 unless ctx.options["lm_head"] == "none". The
embedding table stays fp32 unless ctx.options["embedding"] == "int8" (decode reads
one row of it per token, so int8 there saves memory and disk, not time):
         e = embedding(W, ids)  ->  e = glmc.embedding_int8(ids, Q, row_scales)
declines: quant "none"; non-constant weights; K < 16.
"""

from __future__ import annotations

import hashlib

import torch
from torch.fx import GraphModule

from glmc.ir import PassContext, PassResult
from glmc.match import add_constant, aten, attr_tensor, finish, is_op, replace, val
from glmc.ops import embedding_int8, linear_nbits  # noqa: F401  (registers torch.ops.glmc)
from glmc.quant import Packed, dequantize, quantize

ALPHAS = [i / 10 for i in range(11)]


def _digest(w: torch.Tensor) -> str:
    return hashlib.blake2b(w.detach().contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def _int8_block(K: int) -> int:
    """int8 is per output channel; its scale is replicated over blocks of this size. The
    largest power of two <= 128 dividing K avoids padding; 128 (with padding) otherwise."""
    for b in (128, 64, 32, 16):
        if K % b == 0:
            return b
    return 128


def _lm_head(gm: GraphModule):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    first = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    return first if is_op(first, aten.linear.default) else None


def _search_scale(w: torch.Tensor, x: torch.Tensor, bits: int, group: int, symmetric: bool):
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


def _quantize_embeddings(gm: GraphModule, cache: dict) -> int:
    hits = 0
    for node in [n for n in gm.graph.nodes if is_op(n, aten.embedding.default)]:
        w = attr_tensor(gm, node.args[0])
        if w is None or w.dim() != 2:
            continue
        key = (_digest(w), "embedding")
        if key not in cache:
            wf = w.detach().float()
            scale = (wf.abs().amax(dim=1) / 127).clamp_min(1e-12)
            cache[key] = (torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8), scale)
        q, scale = cache[key]
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(torch.ops.glmc.embedding_int8.default,
                                           (node.args[1], add_constant(gm, "qembedding", q),
                                            add_constant(gm, "qembedding_scales", scale)))
        replace(node, fused)
        hits += 1
    return hits


def quantize_weights(gm: GraphModule, ctx: PassContext) -> PassResult:
    quant = ctx.quant
    if quant == "none":
        return PassResult(gm, 0)
    bits = 4 if quant == "int4" else 8
    group = ctx.options.get("group_size", 128) if bits == 4 else 128
    symmetric = ctx.options.get("symmetric", True)
    # shared across the entry points of one compile: each weight is quantized once
    cache: dict = ctx.options.setdefault("quant_cache", {})
    calib: dict = ctx.options.get("calibration_rows") or {}
    report: dict = ctx.options.setdefault("quant_report", {})
    lm_head = _lm_head(gm)
    lm_mode = ctx.options.get("lm_head", "int8")
    matches = 0
    graph = gm.graph
    if ctx.options.get("embedding") == "int8":
        matches += _quantize_embeddings(gm, cache)
    for node in [n for n in graph.nodes if is_op(n, aten.linear.default)]:
        w = attr_tensor(gm, node.args[1])
        if w is None or w.dim() != 2 or w.shape[1] < 16:
            continue
        b_bits = bits
        if node is lm_head:
            if lm_mode == "none":
                continue
            b_bits = 8
        key = (_digest(w), b_bits)
        if key not in cache:
            wf = w.detach().float()
            rows = calib.get(key[0])
            s, alpha = None, 0.0
            if rows is not None and b_bits == 4:
                s, _, alpha = _search_scale(wf, rows, b_bits, group, symmetric)
            packed: Packed = quantize(wf * s if s is not None else wf, b_bits,
                                      group if b_bits == 4 else _int8_block(wf.shape[1]), symmetric)
            deq = dequantize(packed) / (s if s is not None else 1.0)
            cache[key] = (packed, s)
            name = node.args[1].target if node.args[1].op == "get_attr" else str(node.args[1])
            report[name] = {"bits": b_bits, "shape": list(wf.shape), "alpha": alpha,
                            "relative_error": round(float((deq - wf).norm() / wf.norm().clamp_min(1e-30)), 6),
                            "bytes_fp32": wf.numel() * 4, "bytes_packed": packed.nbytes()}
        packed, s = cache[key]
        x = node.args[0]
        bias = node.args[2] if len(node.args) > 2 else None
        with graph.inserting_before(node):
            q = add_constant(gm, "qweight", packed.qweight)
            sc = add_constant(gm, "qscales", packed.scales)
            zp = add_constant(gm, "qzeros", packed.zeros) if packed.zeros is not None else None
            if s is not None:
                inv = add_constant(gm, "act_scale_inv", (1.0 / s).to(torch.float32))
                x = graph.call_function(aten.mul.Tensor, (x, inv))
                x.meta["val"] = val(node.args[0])
            fused = graph.call_function(
                torch.ops.glmc.linear_nbits.default,
                (x, q, sc, zp, bias, packed.K, packed.bits, packed.block_size))
        replace(node, fused)
        matches += 1
    return finish(gm, matches)
