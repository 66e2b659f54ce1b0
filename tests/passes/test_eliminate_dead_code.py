"""eliminate_dead_code: counts what the rewrites orphaned; a graph without dead nodes is unchanged."""

from __future__ import annotations

import pytest
import torch

from glmc.passes.eliminate_dead_code import eliminate_dead_code
from tests.passes.conftest import MODELS, context, inputs, prepared

NAME = "eliminate_dead_code"


@pytest.mark.parametrize("variant", MODELS)
def test_nothing_left_in_pipeline_order(traced, variant):
    """Every fusion drops what it orphans, so at the end of the pipeline there is nothing
    left to remove (0 on every model type)."""
    _, _, _, graphs = traced(variant)
    for entry in ("prefill", "decode"):
        gm = prepared(graphs[entry], NAME, context(entry))
        assert eliminate_dead_code(gm, context(entry)).matches == 0


@pytest.mark.parametrize("dead", [1, 5])
def test_removes_exactly_the_orphans_and_keeps_numerics(traced, dead):
    _, _, _, graphs = traced("glm4-mqa")
    g = graphs["decode"]
    gm = prepared(g, NAME, context("decode"))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("past"))
    node = x
    for _ in range(dead):                    # a chain of `dead` nodes nobody reads
        with gm.graph.inserting_after(node):
            node = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, 2.0))
    gm.recompile()
    args = inputs(g)
    with torch.no_grad():
        want = gm(*args)
        r = eliminate_dead_code(gm, context("decode"))
        got = r.gm(*args)
    assert r.matches == dead
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_declines_live_nodes():
    class M(torch.nn.Module):
        def forward(self, x):
            unused = torch.ops.aten.mul.Tensor(x, 2.0)  # noqa: F841
            return torch.ops.aten.add.Tensor(x, 1.0)

    gm = torch.fx.symbolic_trace(M())
    assert eliminate_dead_code(gm, context("prefill")).matches == 1
    code = gm.code
    assert eliminate_dead_code(gm, context("prefill")).matches == 0 and gm.code == code
    assert torch.equal(gm(torch.ones(2)), torch.full((2,), 2.0))
