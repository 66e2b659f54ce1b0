"""fuse_gelu_mlp (the worked example of adding a fusion: docs/ARCHITECTURE.md): one site
per layer on GeLU models (exact and tanh), none on silu models, numerics unchanged,
its declines clause, and an end-to-end compile checked against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import glmc
from glmc.ir import histogram
from tests.passes.conftest import ENTRIES, MODELS, apply, check_pass, context, prepared
from tests.passes.mutate import aten, keep_alive, nodes
from tests.passes.test_fuse_swiglu import TwoLinears, _run
from tests.tolerances import TOLERANCES

NAME = "fuse_gelu_mlp"
GELU_ACTS = ("gelu", "gelu_pytorch_tanh")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variant", MODELS)
def test_counts_and_numerics(traced, variant, entry):
    _, L, act, _ = traced(variant)
    expected = L if act in GELU_ACTS else 0
    gm = check_pass(traced, variant, entry, NAME, expected)
    hist = histogram(gm)
    assert hist["glmc.geglu"] == expected and (expected == 0 or "aten.gelu" not in hist)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_two_linear_form_keeps_the_approximation(approximate):
    gm, matches, got, want = _run(TwoLinears(act=lambda t: torch.nn.functional.gelu(t, approximate=approximate)),
                                  NAME)
    assert matches == 1
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.glmc.geglu.default)
    assert node.args[1] == approximate
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCES["pass_fp32"])


def test_declines_an_activation_with_other_users(traced):
    _, L, _, graphs = traced("glm-gelu")
    gm = prepared(graphs["prefill"], NAME, context("prefill"))
    keep_alive(gm, nodes(gm, aten.gelu.default)[0])
    assert apply(gm, NAME, context("prefill"))[1] == L - 1


@pytest.mark.parametrize("variant", ["glm-gelu", "glm4-gelu-tanh"])
def test_gelu_model_compiles_and_matches_transformers(variant, artifacts, checkpoints, reference):
    """--target cpu end to end: the ONNX Gelu lowering of glmc::geglu against transformers'
    eager model (tests/test_end_to_end.py also teacher-forces every decode step of these
    variants; tests/test_gpu_target.py runs the GPU lowering)."""
    rt = glmc.load(artifacts(variant))
    counts = {(p["graph"], p["name"]): p["matches"] for p in rt.manifest["passes"]}
    assert counts[("extend", NAME)] == rt.config["num_hidden_layers"]      # cpu: the one generation entry
    ids = [5, 9, 13, 17, 21]
    with torch.no_grad():
        want = reference(checkpoints(variant))(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(rt.logits(ids), want, rtol=0, atol=TOLERANCES["artifact_fp32"])
