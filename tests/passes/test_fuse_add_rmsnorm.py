"""fuse_add_rmsnorm: every RMSNorm fused (with its residual add where there is one):
2 per layer + the final norm (glm), 4 per layer + 1 (glm4's extra post-norms);
numerics unchanged, and each 'declines' clause on a near-miss graph."""

from __future__ import annotations

import pytest

from glmc.ir import histogram
from tests.passes.conftest import ENTRIES, MODELS, check_pass, near_miss
from tests.passes.mutate import aten, keep_alive, nodes, non_constant, set_arg

NAME = "fuse_add_rmsnorm"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variant", MODELS)
def test_counts_and_numerics(traced, variant, entry):
    model_type, L, _, _ = traced(variant)
    expected = (4 if model_type == "glm4" else 2) * L + 1
    gm = check_pass(traced, variant, entry, NAME, expected)
    hist = histogram(gm)
    assert hist["glmc.add_rms_norm"] + hist["glmc.rms_norm"] == expected and "aten.rsqrt" not in hist


def _near_miss(traced, mutate):
    matches, L = near_miss(traced, NAME, mutate)
    return matches, 2 * L + 1          # glm-gqa: two norms per layer and the final one


def _first_rsqrt(gm):
    return nodes(gm, aten.rsqrt.default)[0]


def _weight_mul(rs):
    """rsqrt -> h * rs -> [casts] -> w * ...: the node multiplying by the weight."""
    n = next(iter(rs.users))
    while len(n.users) == 1 and next(iter(n.users)).target != aten.mul.Tensor:
        n = next(iter(n.users))
    return next(iter(n.users))


def test_declines_a_non_constant_weight(traced):
    def mutate(gm):
        y = _weight_mul(_first_rsqrt(gm))
        w = next(a for a in y.args if getattr(a, "op", None) == "get_attr")
        non_constant(gm, w)
    matches, expected = _near_miss(traced, mutate)
    assert matches == expected - 1


def test_declines_eps_that_is_not_a_scalar(traced):
    def mutate(gm):
        add = _first_rsqrt(gm).args[0]
        set_arg(add, 1, add.args[0])
    matches, expected = _near_miss(traced, mutate)
    assert matches == expected - 1


def test_declines_a_mean_not_over_the_last_dim(traced):
    def mutate(gm):
        mean = _first_rsqrt(gm).args[0].args[0]
        set_arg(mean, 1, [0])
    matches, expected = _near_miss(traced, mutate)
    assert matches == expected - 1


def test_declines_a_normalised_value_with_other_users(traced):
    matches, expected = _near_miss(traced, lambda gm: keep_alive(gm, _first_rsqrt(gm)))
    assert matches == expected - 1
