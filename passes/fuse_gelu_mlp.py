"""Fuse GLM's GeLU MLP (GeGLU: gelu on the gate half, times the up half) into glmc::geglu.

before:  g, u = chunk(linear(x, W_gate_up), 2, -1);  y = u * gelu(g, approximate)
after:   y = glmc.geglu(linear(x, W_gate_up), approximate)
Configs with hidden_act gelu (exact, erf) or gelu_pytorch_tanh (tanh approximation)
trace to this; GLM-130B's FFN is GeGLU. (gelu_new writes tanh out as elementwise ops
and stays unfused.)
declines: everything fuse_swiglu declines (the same rewrites, glmc.passes.fuse_swiglu).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import glmc.ops  # noqa: F401  (registers torch.ops.glmc)
from glmc.ir import PassContext
from glmc.match import aten
from glmc.passes.fuse_swiglu import gated_mlp
from glmc.rewrite import rewrite

# gelu's keyword as a graph may spell it -> glmc::geglu's approximate argument
SPELLINGS = (({}, "none"), ({"approximate": "none"}, "none"), ({"approximate": "tanh"}, "tanh"))


def fuse_gelu_mlp(gm: GraphModule, ctx: PassContext):
    rewrites = [r for kwargs, approximate in SPELLINGS
                for r in gated_mlp(aten.gelu.default, kwargs, torch.ops.glmc.geglu.default, (approximate,))]
    return rewrite(gm, ctx, *rewrites)
