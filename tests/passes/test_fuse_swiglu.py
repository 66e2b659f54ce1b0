"""fuse_swiglu: one site per layer on silu models (none on GeLU models), numerics
unchanged, the two-linear form packed, and each 'declines' clause."""

from __future__ import annotations

import pytest
import torch

from glmc.ir import histogram
from tests.passes.conftest import ENTRIES, MODELS, apply, check_pass, context, export, near_miss
from tests.passes.mutate import aten, keep_alive, nodes, set_arg
from tests.tolerances import TOLERANCES

NAME = "fuse_swiglu"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variant", MODELS)
def test_counts_and_numerics(traced, variant, entry):
    _, L, act, _ = traced(variant)
    gm = check_pass(traced, variant, entry, NAME, L if act == "silu" else 0)
    assert histogram(gm)["glmc.swiglu"] == (L if act == "silu" else 0)


class TwoLinears(torch.nn.Module):
    def __init__(self, act=torch.nn.functional.silu, bias=False, same_input=True):
        super().__init__()
        self.act, self.same_input = act, same_input
        self.gate = torch.nn.Linear(8, 16, bias=bias)
        self.up = torch.nn.Linear(8, 16, bias=bias)

    def forward(self, x):
        return self.act(self.gate(x)) * self.up(x if self.same_input else x * 2.0)


def _run(module, name=NAME):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    gm = export(module, x)
    want = module(x)
    gm, matches = apply(gm, name, context("prefill"))
    return gm, matches, gm(x), want


def test_two_linear_form_is_packed():
    gm, matches, got, want = _run(TwoLinears())
    assert matches == 1
    hist = histogram(gm)
    assert hist["glmc.swiglu"] == 1 and hist["aten.linear"] == 1
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCES["pass_fp32"])


@pytest.mark.parametrize("why", ["biased projections", "different inputs"])
def test_two_linear_form_declines(why):
    module = TwoLinears(bias=True) if why == "biased projections" else TwoLinears(same_input=False)
    gm, matches, _, _ = _run(module)
    assert matches == 0 and "glmc.swiglu" not in histogram(gm)


def _near_miss(traced, mutate):
    return near_miss(traced, NAME, mutate)


def test_declines_an_activation_with_other_users(traced):
    matches, L = _near_miss(traced, lambda gm: keep_alive(gm, nodes(gm, aten.silu.default)[0]))
    assert matches == L - 1


def test_declines_a_chunk_not_along_the_last_dim(traced):
    matches, L = _near_miss(traced, lambda gm: set_arg(nodes(gm, aten.chunk.default)[0], 2, 0))
    assert matches == L - 1
