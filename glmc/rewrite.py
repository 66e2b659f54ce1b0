"""Rewrites as data: a `Rule` is an anchor op set, a guard-style matcher and a replacement.

    RULE = Rule(anchors=(aten.silu.default,), match=_match, replace=_replace)

    def fuse_x(gm, ctx):
        return rewrite(gm, ctx, RULE)

`match(gm, node, ctx)` looks at a node whose target is one of `anchors` and returns
what the replacement needs, or None ("no, not the pattern"); it must never raise on
a graph it does not recognise (use glmc.match's accessors, which answer None instead
of indexing blindly). `replace(gm, match, ctx)` edits the graph for that one site.
`rewrite` owns the loop every pass used to repeat: scan the anchors, skip nodes an
earlier replacement erased, count the sites, drop what the rewrites orphaned,
recompile.

Why not torch.fx's subgraph rewriter or Inductor's pattern matcher: both match
literal subgraphs, and torch.export with dynamic shapes puts symbolic sizes
(sym_size nodes) into the view/expand arguments of exactly the subgraphs glmc
fuses (attention's head repeat, rotary's slices), so a traced pattern never
matches the traced model. The structural matchers here see through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.fx import GraphModule, Node

from glmc.ir import PassContext, PassResult


@dataclass(frozen=True)
class Rule:
    anchors: tuple                                                   # op overloads a match starts from
    match: Callable[[GraphModule, Node, PassContext], Any]           # -> match or None; never raises
    replace: Callable[[GraphModule, Any, PassContext], None]         # rewrites one matched site


def _erased(node: Node) -> bool:
    return getattr(node, "_erased", False)


def rewrite(gm: GraphModule, ctx: PassContext, *rules: Rule, dce: bool = True) -> PassResult:
    """Apply each rule at every matching anchor, in graph order; the number of sites rewritten.
    `dce`: also drop nodes the rewrites orphaned (fold_noops leaves that to eliminate_dead_code)."""
    matches = 0
    for rule in rules:
        anchors = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in rule.anchors]
        for node in anchors:
            if _erased(node):
                continue
            m = rule.match(gm, node, ctx)
            if m is None:
                continue
            rule.replace(gm, m, ctx)
            matches += 1
    return finish(gm, matches, dce=dce)


def finish(gm: GraphModule, matches: int, report: dict | None = None, dce: bool = True) -> PassResult:
    """The common end of a rewriting pass: drop what the rewrites orphaned, recompile."""
    if matches:
        if dce:
            gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, matches, report or {})
