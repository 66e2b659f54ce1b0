"""The pipeline as a whole: every pass is a no-op on graphs without its patterns, the
pipeline twice equals once, --no-fuse keeps only canonicalization, and the pass
manager names the failing pass."""

from __future__ import annotations

import copy

import pytest
import torch

from glmc.ir import PassResult
from glmc.pipeline import PIPELINE, pipeline, run_pipeline
from tests.passes.conftest import context, export


class Plain(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


class Mlp(torch.nn.Module):
    """Patterns that look like GLM's but are not: a plain linear + gelu (no gate), a mean
    over dim 0, a softmax without a matmul after it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc(x))
        s = torch.rsqrt(h.pow(2).mean(0, keepdim=True) + 1e-5)
        return torch.softmax(h * s, dim=-1)


@pytest.mark.parametrize("module", [Plain, Mlp])
@pytest.mark.parametrize("name", [name for phase, name, _ in PIPELINE if phase != "canonicalize"])
def test_pass_is_noop_on_a_graph_without_its_pattern(name, module):
    fn = {n: f for _, n, f in PIPELINE}[name]
    gm = export(module(), torch.randn(4, 16))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    code = gm.code
    assert fn(gm, context("prefill")).matches == 0
    assert gm.code == code


def test_pipeline_twice_equals_once(traced):
    _, _, _, graphs = traced("glm-gqa")
    for entry in ("prefill", "decode"):
        ctx = context(entry)
        gm, _ = run_pipeline(copy.deepcopy(graphs[entry].gm), ctx, entry)
        code = gm.code
        gm, records = run_pipeline(gm, ctx, entry)
        assert all(r.matches == 0 for r in records), [(r.name, r.matches) for r in records]
        assert gm.code == code


def test_no_fuse_leaves_only_canonicalization():
    names = [n for n, _ in pipeline(context("prefill").with_(fuse=False))]
    assert names == ["fold_noops", "quantize_weights", "eliminate_dead_code"]


def test_stop_before_a_phase():
    names = [n for n, _ in pipeline(context("prefill").with_(stop_before="quantize"))]
    assert "quantize_weights" not in names and names[-1] == "last_token_logits"


def test_a_failing_pass_is_named_with_what_ran_before():
    def broken(gm, ctx):
        raise KeyError("boom")

    def fine(gm, ctx):
        return PassResult(gm, 0)

    gm = export(Plain(), torch.randn(2))
    with pytest.raises(RuntimeError, match=r"pass broken failed on the g graph after \['fine'\]: 'boom'"):
        run_pipeline(gm, context("prefill"), "g", [("fine", fine), ("broken", broken)])


def test_context_is_frozen():
    ctx = context("prefill")
    with pytest.raises(Exception, match="cannot assign"):
        ctx.max_seq_len = 3
    assert ctx.for_entry("decode").entry == "decode" and ctx.entry == "prefill"
