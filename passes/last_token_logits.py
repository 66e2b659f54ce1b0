"""Prefill computes the lm_head only for the last real token of each row.

before:  logits = linear(h, W_lm)                                  (B, T, V)
after:   last = max(attention_mask.sum(1) - 1, 0)
         logits = linear(gather(h, 1, last[:, None, None].expand(-1, 1, Hd)), W_lm)   (B, 1, V)
With right padding the last real token of row b is at attention_mask[b].sum() - 1.
Only the entry points that generation prefills with are rewritten (ctx.entry
"prefill", and "extend" for later chunks of a long prompt, where a row that ended in an
earlier chunk has no real token: it gets position 0, which the runtime ignores); the
full-logits "score" entry keeps every position.
declines: other entry points; an output not produced by a linear of a (B, T, Hd) input
with a constant weight; no attention_mask input.
"""

from __future__ import annotations

from torch.fx import GraphModule

from glmc.ir import PassContext
from glmc.match import arg, aten, attr_tensor, shape
from glmc.rewrite import Rule, rewrite

ENTRIES = ("prefill", "extend")


def _match(gm: GraphModule, logits, ctx: PassContext):
    if ctx.entry not in ENTRIES:
        return None
    graph = gm.graph
    mask = next((n for n in graph.nodes if n.op == "placeholder" and n.name == "attention_mask"), None)
    output = next((n for n in graph.nodes if n.op == "output"), None)
    outs = arg(output, 0)
    first = outs[0] if isinstance(outs, (tuple, list)) and outs else None
    if mask is None or first is not logits or attr_tensor(gm, arg(logits, 1)) is None:
        return None
    h = arg(logits, 0)
    hs = shape(h)
    return (logits, h, mask, hs[-1]) if hs is not None and len(hs) == 3 else None


def _replace(gm: GraphModule, m, ctx: PassContext) -> None:
    logits, h, mask, hidden = m
    graph = gm.graph
    with graph.inserting_before(logits):
        count = graph.call_function(aten.sum.dim_IntList, (mask, [1]))
        last = graph.call_function(aten.clamp_min.default, (graph.call_function(aten.sub.Tensor, (count, 1)), 0))
        idx = graph.call_function(aten.view.default, (last, [-1, 1, 1]))
        idx = graph.call_function(aten.expand.default, (idx, [-1, 1, hidden]))
        picked = graph.call_function(aten.gather.default, (h, 1, idx))
    logits.replace_input_with(h, picked)


RULE = Rule((aten.linear.default,), _match, _replace)


def last_token_logits(gm: GraphModule, ctx: PassContext):
    return rewrite(gm, ctx, RULE, dce=False)
