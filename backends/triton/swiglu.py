"""Gated activations on a packed [gate | up] tensor: out = act(gate) * up.

  glmc::swiglu  act = silu                       (ACT = 0)
  glmc::geglu   act = gelu, exact (erf)          (ACT = 1)
                act = gelu, tanh approximation   (ACT = 2)

Grid: (rows, ceil(I / BLOCK)); the activation in fp32, rounded to the input dtype
before the product, like the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmc.backends.triton._common import Config, Launch, launch, check

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr,   # pointers
                   I,                 # sizes
                   BLOCK: tl.constexpr, ACT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(gu_ptr + row * 2 * I + offs, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * 2 * I + I + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))     # tanh via exp
    tl.store(out_ptr + row * I + offs, up * a.to(gate.dtype), mask=mask)


def configs_cuda(i: int = 4096) -> list[Config]:
    return [Config.of(num_warps=w, num_stages=1, BLOCK=b) for b in (256, 512, 1024, 2048) for w in (2, 4, 8)
            if b // (w * 32) >= 1]


def configs_rocm(i: int = 4096) -> list[Config]:
    return [Config.of(num_warps=w, num_stages=1, BLOCK=b) for b in (256, 512, 1024, 2048) for w in (1, 2, 4, 8)
            if b // (w * 64) >= 1]


def default_config(i: int, vendor: str = "cuda") -> Config:
    return Config.of(num_warps=4, num_stages=1, BLOCK=1024)


def gated(gate_up: torch.Tensor, activation: str = "silu", config: Config | None = None) -> torch.Tensor:
    check(gate_up.shape[-1] % 2 == 0, f"{activation} gate: last dim must be even (packed gate|up), "
                                      f"got {gate_up.shape[-1]}")
    check(activation in ACTIVATIONS, f"gated activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    gate_up = gate_up.contiguous()
    I = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], I))
    rows = gate_up.numel() // max(2 * I, 1)
    config = config or default_config(I)
    launch(Launch(_swiglu_kernel, (rows, triton.cdiv(I, config["BLOCK"])), [gate_up, out, I],
                    dict(config.meta, ACT=ACTIVATIONS[activation]), config, ["gu_ptr", "out_ptr", "I"]))
    return out


def swiglu(gate_up: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    return gated(gate_up, "silu", config)


def geglu(gate_up: torch.Tensor, approximate: str = "none", config: Config | None = None) -> torch.Tensor:
    return gated(gate_up, "gelu" if approximate == "none" else "gelu_tanh", config)
