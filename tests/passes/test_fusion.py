"""Fusion passes: exact match counts on each model type, op set after, numerics
against the unrewritten graph, no-op without the pattern, idempotence.

Tolerance: fp32, max abs 1e-5 on logits and KV outputs (the fused reference ops
compute the same math; differences are summation order).
"""

from __future__ import annotations

import copy

import pytest
import torch

from glmc import checkpoint, trace
from glmc.ir import PassContext, histogram
from glmc.pipeline import PIPELINE, pipeline, run_pipeline

TOL = 1e-5
SEQ = 48

# per-graph counts as a function of (layers, model_type, entry)
EXPECTED = {
    "fuse_rotary": lambda L, mt, entry: 2 * L,
    "fuse_attention": lambda L, mt, entry: L,
    "fuse_qkv": lambda L, mt, entry: L,
    "fuse_add_rmsnorm": lambda L, mt, entry: (4 if mt == "glm4" else 2) * L + 1,
    "fuse_swiglu": lambda L, mt, entry: L,
    "last_token_logits": lambda L, mt, entry: 1 if entry == "prefill" else 0,
}
FUSED_OPS = {"fuse_rotary": "glmc.rotary", "fuse_attention": "glmc.attention", "fuse_swiglu": "glmc.swiglu",
             "fuse_add_rmsnorm": "glmc.add_rms_norm"}


@pytest.fixture(scope="module")
def traced(checkpoints):
    out = {}
    for variant in ("glm-gqa", "glm-mha-tied", "glm4-mqa", "chatglm"):
        loaded = checkpoint.load(checkpoints(variant))
        cfg = loaded.config
        out[variant] = (loaded.model_type, cfg["num_hidden_layers"],
                        {"prefill": trace.trace_prefill(loaded.model, cfg, SEQ),
                         "decode": trace.trace_decode(loaded.model, cfg, SEQ)})
    return out


def _inputs(g, cfg_vocab=500):
    torch.manual_seed(0)
    if g.name == "prefill":
        ids = torch.randint(3, cfg_vocab, (2, 7))
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        return ids, mask
    args = list(g.example_args)
    args[3:] = [torch.randn_like(a) for a in args[3:]]
    return tuple(args)


def _compare(a, b, entry):
    if entry == "prefill":  # last_token_logits: compare the last real token's logits only
        la, lb = a[0], b[0]
        torch.testing.assert_close(lb[0, 0], la[0, -1], rtol=0, atol=TOL)
        torch.testing.assert_close(lb[1, 0], la[1, 4], rtol=0, atol=TOL)
        a, b = a[1:], b[1:]
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=0, atol=TOL)


@pytest.mark.parametrize("variant", ["glm-gqa", "glm-mha-tied", "glm4-mqa", "chatglm"])
@pytest.mark.parametrize("entry", ["prefill", "decode"])
def test_each_pass_fires_with_the_expected_count(traced, variant, entry):
    model_type, L, graphs = traced[variant]
    g = graphs[entry]
    gm = copy.deepcopy(g.gm)
    ctx = PassContext(max_seq_len=SEQ).for_entry(entry)
    args = _inputs(g)
    with torch.no_grad():
        want = g.gm(*args)
        gm, records = run_pipeline(gm, ctx, entry)
        got = gm(*args)
    counts = {r.name: r.matches for r in records}
    for name, expected in EXPECTED.items():
        assert counts[name] == expected(L, model_type, entry), (name, counts)
    hist = histogram(gm)
    for name, op in FUSED_OPS.items():
        assert hist[op] == counts[name] or (name == "fuse_add_rmsnorm" and hist[op] + hist["glmc.rms_norm"] == counts[name])
    for gone in ("aten.softmax", "aten.silu", "aten.rsqrt", "aten.cos", "aten.repeat_interleave", "aten.expand"):
        assert gone not in hist or (gone == "aten.expand" and entry == "prefill"), (gone, hist)
    assert hist["aten.linear"] == 4 * L + 1  # qkv, o, gate_up, down per layer + lm_head
    _compare(want, got, entry)


@pytest.mark.parametrize("name", [name for _, name, _ in PIPELINE])
def test_pass_is_noop_on_a_graph_without_its_pattern(name):
    fn = {n: f for _, n, f in PIPELINE}[name]

    class Plain(torch.nn.Module):
        def forward(self, x):
            return torch.ops.aten.relu.default(x) + 1

    gm = torch.fx.symbolic_trace(Plain())
    code = gm.code
    assert fn(gm, PassContext(max_seq_len=8).for_entry("prefill")).matches == 0
    assert gm.code == code


def test_pipeline_twice_equals_once(traced):
    _, _, graphs = traced["glm-gqa"]
    g = graphs["decode"]
    ctx = PassContext(max_seq_len=SEQ).for_entry("decode")
    gm, _ = run_pipeline(copy.deepcopy(g.gm), ctx, "decode")
    code = gm.code
    gm, records = run_pipeline(gm, ctx, "decode")
    assert all(r.matches == 0 for r in records), [(r.name, r.matches) for r in records]
    assert gm.code == code


def test_no_fuse_leaves_only_canonicalization():
    names = [n for n, _ in pipeline(PassContext(fuse=False))]
    assert names == ["fold_noops", "quantize_weights", "eliminate_dead_code"]


def test_swiglu_two_linear_form_is_packed():
    class TwoLinears(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 16, bias=False)
            self.up = torch.nn.Linear(8, 16, bias=False)

        def forward(self, x):
            return torch.nn.functional.silu(self.gate(x)) * self.up(x)

    from glmc.passes.fuse_swiglu import fuse_swiglu

    m = TwoLinears()
    gm = torch.export.export(m, (torch.randn(2, 3, 8),)).module()
    x = torch.randn(2, 3, 8)
    want = m(x)
    r = fuse_swiglu(gm, PassContext())
    assert r.matches == 1
    hist = histogram(gm)
    assert hist["glmc.swiglu"] == 1 and hist["aten.linear"] == 1
    torch.testing.assert_close(gm(x), want, rtol=0, atol=TOL)
