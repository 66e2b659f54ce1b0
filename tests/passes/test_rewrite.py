"""glmc.rewrite: the two forms of a rewrite, their guards, and the shared loop."""

from __future__ import annotations

import pytest
import torch

from glmc.rewrite import Pattern, Rule, rewrite
from tests.passes.conftest import context, export

aten = torch.ops.aten


class TwoSites(torch.nn.Module):
    def forward(self, x):
        a = torch.relu(x) * 2.0
        b = torch.relu(x + 1.0) * 2.0
        return a + b


def _pattern(x):
    return aten.mul.Tensor(aten.relu.default(x), 2.0)


def _replacement(x):
    return aten.add.Tensor(aten.relu.default(x), aten.relu.default(x))


@pytest.mark.parametrize("allow, expected", [(lambda gm, inputs, ctx: True, 2),
                                             (lambda gm, inputs, ctx: inputs["x"].op == "placeholder", 1),
                                             (lambda gm, inputs, ctx: False, 0)])
def test_pattern_guard_sees_the_bound_inputs(allow, expected):
    gm = export(TwoSites(), torch.randn(3))
    x = torch.randn(3)
    want = gm(x)
    r = rewrite(gm, context("prefill"), Pattern(_pattern, _replacement, allow))
    assert r.matches == expected
    torch.testing.assert_close(r.gm(x), want)
    assert sum(1 for n in r.gm.graph.nodes if n.target == aten.mul.Tensor) == 2 - expected


def test_rule_skips_anchors_an_earlier_replacement_erased():
    """Two anchors, the first replacement erases the second: it is not visited again."""
    gm = export(TwoSites(), torch.randn(3))
    seen = []

    def match(gm, node, ctx):
        seen.append(node.name)
        return node

    def replace(gm, node, ctx):
        for other in [n for n in gm.graph.nodes if n.target == aten.relu.default and n is not node]:
            other.replace_all_uses_with(node)
            gm.graph.erase_node(other)

    r = rewrite(gm, context("prefill"), Rule((aten.relu.default,), match, replace), dce=False)
    assert r.matches == 1 and len(seen) == 1
