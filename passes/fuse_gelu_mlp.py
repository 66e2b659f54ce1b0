"""Fuse GLM's GeLU MLP (GeGLU: gelu on the gate half, times the up half) into glmc::geglu.

before:  g, u = chunk(linear(x, W_gate_up), 2, -1);  y = u * gelu(g, approximate)
after:   y = glmc.geglu(linear(x, W_gate_up), approximate)
Configs with hidden_act gelu (exact, erf) or gelu_new / gelu_pytorch_tanh (tanh
approximation) trace to this; GLM-130B's FFN is GeGLU.
declines: everything fuse_swiglu declines (the same matcher, glmc.passes.fuse_swiglu).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import glmc.ops  # noqa: F401  (registers torch.ops.glmc)
from glmc.ir import PassContext
from glmc.match import arg, aten
from glmc.passes.fuse_swiglu import gated_mlp_rule
from glmc.rewrite import rewrite


def _approximate(gelu) -> tuple:
    return (arg(gelu, 1, "approximate", "none"),)


def fuse_gelu_mlp(gm: GraphModule, ctx: PassContext):
    return rewrite(gm, ctx, gated_mlp_rule(aten.gelu.default, torch.ops.glmc.geglu.default, _approximate))
