"""fuse_qkv: the q, k, v projections of each layer become one linear (with zero bias
filled in where a sibling has none), numerics unchanged, and each 'declines' clause."""

from __future__ import annotations

import pytest
import torch

from glmc.ir import histogram
from tests.passes.conftest import ENTRIES, MODELS, apply, check_pass, context, export, near_miss
from tests.passes.mutate import aten, fresh_input_like, nodes, non_constant, set_arg
from tests.tolerances import TOLERANCES

NAME = "fuse_qkv"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variant", MODELS)
def test_counts_and_numerics(traced, variant, entry):
    _, L, _, _ = traced(variant)
    gm = check_pass(traced, variant, entry, NAME, L)
    assert histogram(gm)["aten.split_with_sizes"] == L


def _first_qkv(gm):
    """The three linears of layer 0 (the first input read by three linears)."""
    for lin in nodes(gm, aten.linear.default):
        group = [u for u in lin.args[0].users if u.target == aten.linear.default]
        if len(group) == 3:
            return group
    raise AssertionError("no q/k/v group in the graph")


def _near_miss(traced, mutate):
    return near_miss(traced, NAME, mutate)


def test_declines_fewer_than_two_linears_on_an_input(traced):
    def mutate(gm):
        q, k, v = _first_qkv(gm)
        set_arg(k, 0, fresh_input_like(gm, k.args[0]))
        set_arg(v, 0, fresh_input_like(gm, v.args[0]))
    matches, L = _near_miss(traced, mutate)
    assert matches == L - 1


def test_declines_non_constant_weights(traced):
    def mutate(gm):
        for lin in _first_qkv(gm):
            non_constant(gm, lin.args[1])
    matches, L = _near_miss(traced, mutate)
    assert matches == L - 1


def test_declines_weights_of_different_dtypes(traced):
    def mutate(gm):
        from glmc.match import attr_tensor

        q = _first_qkv(gm)[0]
        gm.register_buffer("q_weight_f64", attr_tensor(gm, q.args[1]).double())
        with gm.graph.inserting_before(q):
            set_arg(q, 1, gm.graph.get_attr("q_weight_f64"))
    matches, L = _near_miss(traced, mutate)
    assert matches == L - 1


def test_bias_filled_with_zeros_for_a_sibling_without_one():
    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 8, bias=True)
            self.k = torch.nn.Linear(8, 4, bias=False)

        def forward(self, x):
            return self.q(x), self.k(x)

    torch.manual_seed(0)
    m, x = Proj(), torch.randn(2, 3, 8)
    gm = export(m, x)
    want = m(x)
    gm, matches = apply(gm, NAME, context("prefill"))
    assert matches == 1 and histogram(gm)["aten.linear"] == 1
    for a, b in zip(want, gm(x)):
        torch.testing.assert_close(b, a, rtol=0, atol=TOLERANCES["pass_fp32"])
