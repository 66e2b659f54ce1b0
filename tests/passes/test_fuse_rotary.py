"""fuse_rotary: two sites (q, k) per layer on every model type, numerics unchanged,
and each 'declines' clause of its docstring on a near-miss graph."""

from __future__ import annotations

import pytest

from tests.passes.conftest import ENTRIES, MODELS, check_pass, near_miss
from tests.passes.mutate import aten, nodes, set_arg

NAME = "fuse_rotary"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variant", MODELS)
def test_counts_and_numerics(traced, variant, entry):
    _, L, _, _ = traced(variant)
    gm = check_pass(traced, variant, entry, NAME, 2 * L)
    assert sum(1 for n in gm.graph.nodes if n.target == aten.repeat_interleave.self_int) == 0


def _near_miss(traced, variant, mutate):
    return near_miss(traced, NAME, mutate, variant)


def test_declines_non_interleaved_layout(traced):
    """rotate_half by halves is not GLM's layout: a stack over another dim is not matched."""
    def mutate(gm):
        set_arg(nodes(gm, aten.stack.default)[0], 1, 0)
    matches, L = _near_miss(traced, "glm-gqa", mutate)
    assert matches == 2 * L - 1


def test_declines_non_constant_inv_freq(traced):
    def mutate(gm):
        from tests.passes.mutate import non_constant

        inv = [n for n in gm.graph.nodes if n.op == "get_attr" and "inv_freq" in n.target]
        assert inv
        for n in inv:
            non_constant(gm, n)
    matches, _ = _near_miss(traced, "glm-gqa", mutate)
    assert matches == 0


def test_declines_cos_and_sin_from_different_angles(traced):
    def mutate(gm):
        sin = nodes(gm, aten.sin.default)[0]
        with gm.graph.inserting_before(sin):
            other = gm.graph.call_function(aten.neg.default, (sin.args[0],))
        set_arg(sin, 0, other)
    matches, _ = _near_miss(traced, "glm-gqa", mutate)
    assert matches == 0


def test_declines_positions_that_are_not_b_by_t(traced):
    def mutate(gm):
        for un in nodes(gm, aten.unsqueeze.default):
            pos = un.args[0]
            if getattr(pos, "op", None) and pos.meta.get("val") is not None and pos.meta["val"].dim() == 2 \
                    and pos.meta["val"].dtype.is_floating_point is False:
                pos.meta["val"] = pos.meta["val"].flatten()
    matches, _ = _near_miss(traced, "glm-gqa", mutate)
    assert matches == 0


def test_declines_partial_rotary_with_a_foreign_pass_through(traced):
    """The untouched dims R..D must be the rest of the same x (glm-gqa: partial factor 0.5)."""
    def mutate(gm):
        cat = next(c for c in nodes(gm, aten.cat.default)
                   if len(c.args[0]) == 2 and c.args[0][1].target == aten.slice.Tensor
                   and c.args[0][0].target == aten.add.Tensor)
        rest = cat.args[0][1]
        set_arg(rest, 2, rest.args[2] - 2)
    matches, L = _near_miss(traced, "glm-gqa", mutate)
    assert matches == 2 * L - 1
