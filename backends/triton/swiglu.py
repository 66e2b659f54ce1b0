"""SwiGLU on a packed [gate | up] tensor (glmc::swiglu): out = silu(gate) * up.

Grid: (rows, ceil(I / BLOCK)); silu in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmc.backends.triton._common import LAUNCHER, Config, Launch, check


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr,   # pointers
                   I,                 # sizes
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(gu_ptr + row * 2 * I + offs, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * 2 * I + I + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)    # rounded like the reference's silu(gate)
    tl.store(out_ptr + row * I + offs, up * silu, mask=mask)


def configs_cuda(i: int = 4096) -> list[Config]:
    return [Config.of(num_warps=w, num_stages=1, BLOCK=b) for b in (256, 512, 1024, 2048) for w in (2, 4, 8)
            if b // (w * 32) >= 1]


def configs_rocm(i: int = 4096) -> list[Config]:
    return [Config.of(num_warps=w, num_stages=1, BLOCK=b) for b in (256, 512, 1024, 2048) for w in (1, 2, 4, 8)
            if b // (w * 64) >= 1]


def default_config(i: int, vendor: str = "cuda") -> Config:
    return Config.of(num_warps=4, num_stages=1, BLOCK=1024)


def swiglu(gate_up: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    check(gate_up.shape[-1] % 2 == 0, f"swiglu: last dim must be even (packed gate|up), got {gate_up.shape[-1]}")
    gate_up = gate_up.contiguous()
    I = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], I))
    rows = gate_up.numel() // max(2 * I, 1)
    config = config or default_config(I)
    LAUNCHER(Launch(_swiglu_kernel, (rows, triton.cdiv(I, config["BLOCK"])), [gate_up, out, I],
                    dict(config.meta), config, ["gu_ptr", "out_ptr", "I"]))
    return out
