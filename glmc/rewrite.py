"""Rewrites as data, in two forms; `rewrite(gm, ctx, *rewrites)` applies any mix of them.

`Pattern(pattern, replacement, guard)`: the pattern and its replacement are plain
traceable functions over the same inputs, matched by torch.fx's own subgraph rewriter
(which also refuses a match whose inner nodes have users outside it); `guard(gm,
inputs, ctx)` sees the graph nodes bound to the pattern's inputs and answers False to
decline. fuse_swiglu and fuse_gelu_mlp are written this way:

    def pattern(gate_up):
        gate, up = aten.chunk.default(gate_up, 2, -1)
        return aten.mul.Tensor(up, aten.silu.default(gate))

    def replacement(gate_up):
        return glmc.swiglu(gate_up)

`Rule(anchors, match, replace)`: for what a literal pattern cannot say, namely
subgraphs whose view/expand arguments hold the symbolic sizes (sym_size nodes) that
torch.export with dynamic shapes writes there (attention's grouped-query head repeat,
rotary's slices), rewrites that make compile-time constants (q/k/v and gate/up
weight packing, rotary tables, quantized weights), and choices that depend on the
context (entry point, quant mode):

`match(gm, node, ctx)` looks at a node whose target is one of `anchors` and returns
what the replacement needs, or None ("no, not the pattern"); it must never raise on
a graph it does not recognise (use glmc.match's accessors, which answer None instead
of indexing blindly). `replace(gm, match, ctx)` edits the graph for that one site.
`rewrite` owns the loop every pass used to repeat: scan the anchors, skip nodes an
earlier replacement erased, count the sites, drop what the rewrites orphaned,
recompile.

    RULE = Rule(anchors=(aten.softmax.int,), match=_match, replace=_replace)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.fx import GraphModule, Node, subgraph_rewriter

from glmc.ir import PassContext, PassResult


@dataclass(frozen=True)
class Rule:
    anchors: tuple                                                   # op overloads a match starts from
    match: Callable[[GraphModule, Node, PassContext], Any]           # -> match or None; never raises
    replace: Callable[[GraphModule, Any, PassContext], None]         # rewrites one matched site


@dataclass(frozen=True)
class Pattern:
    pattern: Callable                                               # traceable: inputs -> output
    replacement: Callable                                           # traceable, same inputs
    guard: Callable[[GraphModule, dict, PassContext], bool] | None = None   # (gm, {input: node}, ctx)


def _erased(node: Node) -> bool:
    return getattr(node, "_erased", False)


def _apply_rule(gm: GraphModule, ctx: PassContext, rule: Rule) -> int:
    matches = 0
    anchors = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in rule.anchors]
    for node in anchors:
        if _erased(node):
            continue
        m = rule.match(gm, node, ctx)
        if m is None:
            continue
        rule.replace(gm, m, ctx)
        matches += 1
    return matches


def _apply_pattern(gm: GraphModule, ctx: PassContext, p: Pattern) -> int:
    def keep(match, original_graph, pattern_graph) -> bool:
        if p.guard is None:
            return True
        inputs = {pn.name: gn for pn, gn in match.nodes_map.items() if pn.op == "placeholder"}
        return bool(p.guard(gm, inputs, ctx))

    replaced = subgraph_rewriter.replace_pattern_with_filters(gm, p.pattern, p.replacement, match_filters=[keep])
    for r in replaced:          # the replacement computes what the matched output did: keep its shape record
        if r.replacements and "val" in r.anchor.meta:
            r.replacements[-1].meta["val"] = r.anchor.meta["val"]
    return len(replaced)


def rewrite(gm: GraphModule, ctx: PassContext, *rewrites: Rule | Pattern, dce: bool = True) -> PassResult:
    """Apply each rewrite in order (a Rule at every matching anchor in graph order, a Pattern at
    every match); the number of sites rewritten. `dce`: also drop nodes the rewrites orphaned
    (fold_noops leaves that to eliminate_dead_code)."""
    matches = 0
    for r in rewrites:
        matches += _apply_pattern(gm, ctx, r) if isinstance(r, Pattern) else _apply_rule(gm, ctx, r)
    return finish(gm, matches, dce=dce)


def finish(gm: GraphModule, matches: int, report: dict | None = None, dce: bool = True) -> PassResult:
    """The common end of a rewriting pass: drop what the rewrites orphaned, recompile."""
    if matches:
        if dce:
            gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, matches, report or {})
