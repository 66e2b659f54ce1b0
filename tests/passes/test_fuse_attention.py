"""fuse_attention: one site per layer on every model type, the KV cache read in place
(no repeat, no concat left), numerics unchanged, and each 'declines' clause."""

from __future__ import annotations

import pytest

from glmc.ir import histogram
from tests.passes.conftest import ENTRIES, MODELS, check_pass, near_miss
from tests.passes.mutate import aten, keep_alive, nodes, set_arg

NAME = "fuse_attention"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variant", MODELS)
def test_counts_and_numerics(traced, variant, entry):
    _, L, _, _ = traced(variant)
    gm = check_pass(traced, variant, entry, NAME, L)
    hist = histogram(gm)
    assert hist["glmc.attention"] == L and "aten.softmax" not in hist and "aten._softmax" not in hist


def _softmaxes(gm):
    return nodes(gm, aten.softmax.int, aten._softmax.default)


def _near_miss(traced, entry, mutate):
    return near_miss(traced, NAME, mutate, entry=entry)


def test_declines_softmax_not_over_the_last_dim(traced):
    matches, L = _near_miss(traced, "prefill", lambda gm: set_arg(_softmaxes(gm)[0], 1, 1))
    assert matches == L - 1


def test_declines_without_an_additive_mask(traced):
    def mutate(gm):
        sm = _softmaxes(gm)[0]
        add = sm.args[0]
        scaled = next(a for a in add.args if a.target == aten.mul.Tensor)
        set_arg(sm, 0, scaled)
    matches, L = _near_miss(traced, "prefill", mutate)
    assert matches == L - 1


def test_declines_a_scale_not_after_q_kt(traced):
    def mutate(gm):
        add = _softmaxes(gm)[0].args[0]
        mul = next(a for a in add.args if a.target == aten.mul.Tensor)
        mul.target = aten.div.Tensor            # scale by division: another pattern
    matches, L = _near_miss(traced, "prefill", mutate)
    assert matches == L - 1


def test_declines_a_softmax_with_other_users(traced):
    matches, L = _near_miss(traced, "prefill", lambda gm: keep_alive(gm, _softmaxes(gm)[0]))
    assert matches == L - 1


def test_declines_k_and_v_with_different_cache_structure(traced):
    """decode: K comes from cat(past_k, k), V from the new v alone."""
    def mutate(gm):
        cats = [c for c in nodes(gm, aten.cat.default) if c.args[1] in (-2, 2)]
        v_cat = cats[1]                          # layer 0: k's cat, then v's
        v_cat.replace_all_uses_with(v_cat.args[0][1])
    matches, L = _near_miss(traced, "decode", mutate)
    assert matches == L - 1
