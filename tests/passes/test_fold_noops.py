"""fold_noops: exact counts on each model type, numerics unchanged, idempotent, no-op without matches."""

from __future__ import annotations

import copy

import pytest
import torch
from glmc.passes.eliminate_dead_code import eliminate_dead_code
from glmc.passes.fold_noops import fold_noops

from glmc import checkpoint, trace
from glmc.ir import PassContext, histogram


@pytest.fixture(scope="module")
def graphs(checkpoints):
    out = {}
    for variant in ("glm-gqa", "glm4-mqa", "chatglm"):
        loaded = checkpoint.load(checkpoints(variant))
        out[variant] = (trace.trace_prefill(loaded.model, loaded.config, 32), loaded.config["num_hidden_layers"])
    return out


def test_counts_and_what_is_left(graphs):
    for variant, (g, n_layers) in graphs.items():
        gm = copy.deepcopy(g.gm)
        before = histogram(gm)
        r = fold_noops(gm, PassContext())
        after = histogram(r.gm)
        folded = sum(before[k] - after.get(k, 0) for k in before)
        assert r.matches == folded > 0
        # one attention dropout per layer, all gone
        assert before["aten.dropout"] == n_layers and "aten.dropout" not in after
        assert "aten._assert_tensor_metadata" not in after


def test_numerics_unchanged(graphs):
    g, _ = graphs["glm4-mqa"]
    gm = copy.deepcopy(g.gm)
    fold_noops(gm, PassContext())
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    for a, b in zip(g.gm(ids, mask), gm(ids, mask)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_idempotent_and_noop_without_pattern(graphs):
    g, _ = graphs["glm-gqa"]
    gm = copy.deepcopy(g.gm)
    fold_noops(gm, PassContext())
    code = gm.code
    assert fold_noops(gm, PassContext()).matches == 0
    assert gm.code == code

    plain = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    assert fold_noops(plain, PassContext()).matches == 0


def test_dead_code_counts_removed_nodes():
    class M(torch.nn.Module):
        def forward(self, x):
            unused = torch.ops.aten.mul.Tensor(x, 2.0)  # noqa: F841
            return torch.ops.aten.add.Tensor(x, 1.0)

    gm = torch.fx.symbolic_trace(M())
    assert eliminate_dead_code(gm, PassContext()).matches == 1
    assert eliminate_dead_code(gm, PassContext()).matches == 0
    assert torch.equal(gm(torch.ones(2)), torch.full((2,), 2.0))
