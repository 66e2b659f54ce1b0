"""quantize_weights: every linear after fusion (qkv, o, gate_up, down per layer, and the
lm_head at int8) becomes glmc.linear_nbits; --embedding int8 adds the table; the report
travels in PassResult; outputs stay close to the unquantized graph; declines clauses."""

from __future__ import annotations

import copy

import pytest
import torch

from glmc.ir import QuantConfig, histogram, make_context
from tests.passes.conftest import MODELS, SEQ, apply, check_pass, export, inputs, prepared

NAME = "quantize_weights"


def _ctx(entry="prefill", **q):
    return make_context("cpu", quant=QuantConfig(**q), max_seq_len=SEQ, entry=entry)


@pytest.mark.parametrize("variant", MODELS)
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_every_linear_quantized(traced, variant, quant):
    _, L, _, _ = traced(variant)
    gm = check_pass(traced, variant, "decode", NAME, 4 * L + 1, quant=quant)
    hist = histogram(gm)
    assert hist["glmc.linear_nbits"] == 4 * L + 1 and "aten.linear" not in hist


def test_report_and_embedding_and_lm_head_options(traced):
    _, L, _, graphs = traced("glm-gqa")
    g = graphs["prefill"]
    base = prepared(g, NAME, _ctx(mode="int4"))
    ctx = _ctx(mode="int4", embedding="int8")
    gm, records = _run(copy.deepcopy(base), ctx)
    assert records.matches == 4 * L + 1 + 1 and histogram(gm)["glmc.embedding_int8"] == 1
    report = records.report["quantization"]
    assert len(report) == 4 * L + 1 and sum(r["bits"] == 8 for r in report.values()) == 1   # the lm_head
    assert all(0 < r["relative_error"] < 0.2 for r in report.values())
    _, kept = _run(copy.deepcopy(base), _ctx(mode="int4", lm_head="none"))
    assert kept.matches == 4 * L                # the lm_head left fp32


def _run(gm, ctx):
    from glmc.passes.quantize_weights import quantize_weights

    r = quantize_weights(gm, ctx)
    return r.gm, r


def test_int8_outputs_close_to_the_unquantized_graph(traced):
    _, _, _, graphs = traced("glm4-mqa")
    g = graphs["prefill"]
    ctx = _ctx(mode="int8")
    gm = prepared(g, NAME, ctx)
    args = inputs(g)
    with torch.no_grad():
        want = gm(*args)[0]
        gm, _ = apply(gm, NAME, ctx)
        got = gm(*args)[0]
    rel = float((got - want).norm() / (want - want.mean(-1, keepdim=True)).norm())
    assert rel < 0.05, rel            # int8 per-channel noise on random weights: ~1%


def test_declines_with_quant_none(traced):
    _, _, _, graphs = traced("glm-gqa")
    gm = prepared(graphs["prefill"], NAME, _ctx())
    code = gm.code
    gm, matches = apply(gm, NAME, _ctx())
    assert matches == 0 and gm.code == code


@pytest.mark.parametrize("K, expected", [(8, 0), (16, 1)])
def test_declines_k_below_16(K, expected):
    gm = export(torch.nn.Linear(K, 32), torch.randn(2, K))
    gm, matches = apply(gm, NAME, _ctx(mode="int4", group_size=16))
    assert matches == expected


def test_declines_a_non_constant_weight(traced):
    from tests.passes.mutate import aten, nodes, non_constant

    _, L, _, graphs = traced("glm-gqa")
    gm = prepared(graphs["prefill"], NAME, _ctx(mode="int4"))
    non_constant(gm, nodes(gm, aten.linear.default)[0].args[1])
    assert apply(gm, NAME, _ctx(mode="int4"))[1] == 4 * L
