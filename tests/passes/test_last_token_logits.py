"""last_token_logits: the prefill (and extend) lm_head runs for each row's last real
token only; decode and score keep every position; each 'declines' clause."""

from __future__ import annotations

import pytest

from glmc.ir import PassContext
from tests.passes.conftest import MODELS, apply, check_pass, context, prepared
from tests.passes.mutate import non_constant

NAME = "last_token_logits"


@pytest.mark.parametrize("variant", MODELS)
def test_prefill_one_site_and_last_token_numerics(traced, variant):
    check_pass(traced, variant, "prefill", NAME, 1)


@pytest.mark.parametrize("variant", ["glm-gqa", "glm4-mqa"])
def test_decode_is_left_alone(traced, variant):
    check_pass(traced, variant, "decode", NAME, 0)


def test_declines_the_score_entry(traced):
    _, _, _, graphs = traced("glm-gqa")
    ctx: PassContext = context("prefill").for_entry("score")
    gm = prepared(graphs["prefill"], NAME, ctx)
    code = gm.code
    gm, matches = apply(gm, NAME, ctx)
    assert matches == 0 and gm.code == code


def test_declines_without_an_attention_mask_input(traced):
    """The decode graph has no attention_mask placeholder: told it is a prefill, it still declines."""
    _, _, _, graphs = traced("glm-gqa")
    gm = prepared(graphs["decode"], NAME, context("decode"))
    assert apply(gm, NAME, context("prefill"))[1] == 0


def test_declines_a_non_constant_lm_head(traced):
    _, _, _, graphs = traced("glm-gqa")
    gm = prepared(graphs["prefill"], NAME, context("prefill"))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    non_constant(gm, out.args[0][0].args[1])
    assert apply(gm, NAME, context("prefill"))[1] == 0
