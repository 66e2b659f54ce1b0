"""Remove nodes whose results nobody uses (after other rewrites orphan them).

before:  a = f(x); b = g(x); return b
after:   b = g(x); return b
declines: nodes with side effects (torch.fx's is_impure), graph inputs/outputs.
"""

from __future__ import annotations

from torch.fx import GraphModule

from glmc.ir import PassContext, PassResult, node_count


def eliminate_dead_code(gm: GraphModule, ctx: PassContext) -> PassResult:
    before = node_count(gm)
    gm.graph.eliminate_dead_code()
    removed = before - node_count(gm)
    if removed:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return PassResult(gm, removed)
