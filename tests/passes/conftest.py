"""What the per-pass tests share: each model variant traced once (prefill and decode),
a way to run the pipeline up to and through one pass, and numerics against the
unrewritten graph. Counts are checked in the pipeline's order, because a pass sees
what the passes before it left (fuse_qkv only sees q/k/v once attention is fused)."""

from __future__ import annotations

import copy

import pytest
import torch

from glmc import checkpoint, trace
from glmc.ir import QuantConfig, make_context
from glmc.pipeline import pipeline, run_pipeline
from tests.tolerances import TOLERANCES

SEQ = 48
MODELS = ("glm-gqa", "glm-mha-tied", "glm4-mqa", "chatglm", "glm-gelu", "glm4-gelu-tanh")
ENTRIES = ("prefill", "decode")


@pytest.fixture(scope="session")
def traced(checkpoints):
    """variant -> (model_type, layers, hidden_act, {entry: Traced}), traced on first use."""
    cache = {}

    def get(variant):
        if variant not in cache:
            loaded = checkpoint.load(checkpoints(variant))
            cfg = loaded.config
            cache[variant] = (loaded.model_type, cfg["num_hidden_layers"], cfg.get("hidden_act", "silu"),
                              {"prefill": trace.trace_prefill(loaded.model, cfg, SEQ),
                               "decode": trace.trace_decode(loaded.model, cfg, SEQ)})
        return cache[variant]

    return get


def context(entry: str, quant: str = "none", **quant_options):
    return make_context("cpu", quant=QuantConfig(quant, **quant_options), max_seq_len=SEQ, entry=entry)


def split_at(name: str, ctx):
    """(the passes before `name`, the pass itself) in pipeline order."""
    passes = pipeline(ctx)
    names = [n for n, _ in passes]
    i = names.index(name)
    return passes[:i], passes[i]


def prepared(g, name: str, ctx):
    """A copy of g's graph with every pass before `name` applied (the input `name` sees)."""
    before, _ = split_at(name, ctx)
    gm, _ = run_pipeline(copy.deepcopy(g.gm), ctx, g.name, before)
    return gm


def apply(gm, name: str, ctx):
    """Run pass `name` alone on gm (through the pass manager, which lints the graph)."""
    _, step = split_at(name, ctx)
    gm, records = run_pipeline(gm, ctx, "test", [step])
    return gm, records[0].matches


def inputs(g, vocab: int = 500):
    torch.manual_seed(0)
    if g.name == "prefill":
        ids = torch.randint(3, vocab, (2, 7))
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        return ids, mask
    args = list(g.example_args)
    args[3:] = [torch.randn_like(a) for a in args[3:]]
    return tuple(args)


def assert_same_outputs(want, got, entry: str, last_token: bool = False, atol: float = TOLERANCES["pass_fp32"]):
    """Outputs of the rewritten graph vs the unrewritten one. With last_token (prefill after
    last_token_logits), compare each row's last real token's logits only."""
    if last_token:
        torch.testing.assert_close(got[0][0, 0], want[0][0, -1], rtol=0, atol=atol)
        torch.testing.assert_close(got[0][1, 0], want[0][1, 4], rtol=0, atol=atol)
        want, got = want[1:], got[1:]
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=0, atol=atol)


def check_pass(traced, variant: str, entry: str, name: str, expected: int, quant: str = "none"):
    """Pass `name` on variant's entry graph: exactly `expected` sites; outputs unchanged;
    a second run finds nothing. Returns the rewritten graph."""
    _, _, _, graphs = traced(variant)
    g = graphs[entry]
    ctx = context(entry, quant)
    gm = prepared(g, name, ctx)
    args = inputs(g)
    with torch.no_grad():
        want = g.gm(*args)
        gm, matches = apply(gm, name, ctx)
        got = gm(*args)
    assert matches == expected, (variant, entry, name, matches, expected)
    if quant == "none":
        assert_same_outputs(want, got, entry, last_token=(name == "last_token_logits" and entry == "prefill"))
    code = gm.code
    gm, again = apply(gm, name, ctx)
    assert again == 0 and gm.code == code, f"{name} is not idempotent ({again} more sites)"
    return gm


def export(module: torch.nn.Module, *args):
    """A small module as the ATen graph torch.export gives (what the passes see)."""
    return torch.export.export(module.eval(), args).module()


def near_miss(traced, name: str, mutate, variant: str = "glm-gqa", entry: str = "prefill"):
    """Pass `name` on variant's graph (as the pipeline hands it over) after mutate(gm) changed
    one site into something the pass must decline: (matches, layers)."""
    _, L, _, graphs = traced(variant)
    gm = prepared(graphs[entry], name, context(entry))
    mutate(gm)
    gm.recompile()
    return apply(gm, name, context(entry))[1], L
