"""Prefill computes the lm_head only for the last real token of each row.

before:  logits = linear(h, W_lm)                                  (B, T, V)
after:   last = max(attention_mask.sum(1) - 1, 0)
         logits = linear(gather(h, 1, last[:, None, None].expand(-1, 1, Hd)), W_lm)   (B, 1, V)
With right padding the last real token of row b is at attention_mask[b].sum() - 1.
Only the entry points that generation prefills with are rewritten (ctx.options["entry"]
"prefill", and "extend" for later chunks of a long prompt, where a row that ended in an
earlier chunk has no real token: it gets position 0, which the runtime ignores); the
full-logits "score" entry keeps every position.
declines: other entry points; an output not produced by a linear of a (B, T, Hd) input;
no attention_mask input.
"""

from __future__ import annotations

from torch.fx import GraphModule

from glmc.ir import PassContext, PassResult
from glmc.match import aten, attr_tensor, is_op, val


def last_token_logits(gm: GraphModule, ctx: PassContext) -> PassResult:
    if ctx.options.get("entry") not in ("prefill", "extend"):
        return PassResult(gm, 0)
    graph = gm.graph
    mask = next((n for n in graph.nodes if n.op == "placeholder" and n.name == "attention_mask"), None)
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else None
    if mask is None or not is_op(logits, aten.linear.default) or attr_tensor(gm, logits.args[1]) is None:
        return PassResult(gm, 0)
    h = logits.args[0]
    hv = val(h)
    if hv is None or hv.dim() != 3:
        return PassResult(gm, 0)
    hidden = hv.shape[-1]
    with graph.inserting_before(logits):
        count = graph.call_function(aten.sum.dim_IntList, (mask, [1]))
        last = graph.call_function(aten.clamp_min.default, (graph.call_function(aten.sub.Tensor, (count, 1)), 0))
        idx = graph.call_function(aten.view.default, (last, [-1, 1, 1]))
        idx = graph.call_function(aten.expand.default, (idx, [-1, 1, hidden]))
        picked = graph.call_function(aten.gather.default, (h, 1, idx))
    logits.replace_input_with(h, picked)
    gm.recompile()
    return PassResult(gm, 1)
