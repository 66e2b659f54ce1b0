"""fold_noops: exact counts per model type, numerics bit-identical, idempotent, and each
'declines' clause on a hand-built near-miss graph."""

from __future__ import annotations

import copy

import pytest
import torch

from glmc.ir import histogram
from glmc.passes.fold_noops import fold_noops
from tests.passes.conftest import ENTRIES, MODELS, context, inputs
from tests.tolerances import TOLERANCES

aten = torch.ops.aten
# golden: what torch.export leaves that computes nothing, per (variant, entry) at SEQ 48
EXPECTED = {
    ("glm-gqa", "prefill"): 52, ("glm-gqa", "decode"): 46,
    ("glm-mha-tied", "prefill"): 56, ("glm-mha-tied", "decode"): 54,
    ("glm4-mqa", "prefill"): 96, ("glm4-mqa", "decode"): 87,
    ("chatglm", "prefill"): 52, ("chatglm", "decode"): 46,
    ("glm-gelu", "prefill"): 52, ("glm-gelu", "decode"): 46,
    ("glm4-gelu-tanh", "prefill"): 64, ("glm4-gelu-tanh", "decode"): 62,
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variant", MODELS)
def test_counts_numerics_idempotence(traced, variant, entry):
    _, L, _, graphs = traced(variant)
    g = graphs[entry]
    gm = copy.deepcopy(g.gm)
    before = histogram(gm)
    args = inputs(g)
    r = fold_noops(gm, context(entry))
    after = histogram(r.gm)
    assert r.matches == EXPECTED[(variant, entry)], r.matches
    assert r.matches == sum(before[k] - after.get(k, 0) for k in before)        # each fold removes one node
    assert "aten._assert_tensor_metadata" not in after and "aten.dropout" not in after
    if entry == "prefill":
        assert before["aten.dropout"] == L                                       # one attention dropout per layer
    with torch.no_grad():
        for a, b in zip(g.gm(*args), r.gm(*args)):
            torch.testing.assert_close(b, a, rtol=0, atol=TOLERANCES["pass_fp32"])   # layouts change, not math
    code = r.gm.code
    assert fold_noops(r.gm, context(entry)).matches == 0 and r.gm.code == code


def _graph(build):
    """A graph with one placeholder x (2, 3, 4) fp32 and whatever build(graph, x) returns."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, 3, 4)
    g.output(build(g, x))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _call(g, target, *args, val=None, **kwargs):
    n = g.call_function(target, args, kwargs)
    if val is not None:
        n.meta["val"] = val
    return n


NEAR_MISSES = {
    "dropout in training mode with p > 0": lambda g, x: _call(g, aten.dropout.default, x, 0.5, True),
    "a cast that changes dtype": lambda g, x: _call(g, aten._to_copy.default, x, dtype=torch.float16,
                                                    val=torch.empty(2, 3, 4, dtype=torch.float16)),
    "a cast with other keyword arguments": lambda g, x: _call(g, aten._to_copy.default, x, dtype=torch.float32,
                                                              memory_format=torch.channels_last,
                                                              val=torch.empty(2, 3, 4)),
    "a slice with a start": lambda g, x: _call(g, aten.slice.Tensor, x, 1, 1, 2**63 - 1, 1),
    "a slice with a step": lambda g, x: _call(g, aten.slice.Tensor, x, 1, 0, 2**63 - 1, 2),
    "a slice with a bounded end": lambda g, x: _call(g, aten.slice.Tensor, x, 1, 0, 2, 1),
    "a cat of two non-empty operands": lambda g, x: _call(g, aten.cat.default, [x, x], 1),
}
FOLDED = {
    "dropout in eval mode": lambda g, x: _call(g, aten.dropout.default, x, 0.5, False),
    "a cast to the same dtype": lambda g, x: _call(g, aten._to_copy.default, x, dtype=torch.float32,
                                                   val=torch.empty(2, 3, 4)),
    "a full slice": lambda g, x: _call(g, aten.slice.Tensor, x, 1, 0, 2**63 - 1, 1),
    "a cat with an empty operand": lambda g, x: _call(
        g, aten.cat.default, [_call(g, aten.empty.memory_format, [0], val=torch.empty(0)), x], 1),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_declines(case):
    gm = _graph(NEAR_MISSES[case])
    code = gm.code
    assert fold_noops(gm, context("prefill")).matches == 0 and gm.code == code


@pytest.mark.parametrize("case", list(FOLDED))
def test_folds_the_positive_twin(case):
    gm = _graph(FOLDED[case])
    assert fold_noops(gm, context("prefill")).matches == 1
    x = torch.randn(2, 3, 4)
    assert torch.equal(gm(x), x)
