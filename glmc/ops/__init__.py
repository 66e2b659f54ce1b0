"""The fused ops passes rewrite into: torch custom ops `glmc::<name>`, one file each.

Each file declares its op with `glmc.registry.define`: a reference implementation in
plain torch (so a rewritten graph still runs, and tests compare against it), a fake
(shape) implementation for torch.export, and the arguments that stay fp32. Backends
lower them (backends/cpu/ops.py, backends/gpu/kernels.py).

Shapes: B batch, T query length, S cache length, H heads, Hkv KV heads, D head dim.
"""

from glmc.ops.add_rms_norm import add_rms_norm
from glmc.ops.attention import attention
from glmc.ops.embedding_int8 import embedding_int8
from glmc.ops.geglu import geglu
from glmc.ops.linear_nbits import linear_nbits
from glmc.ops.rms_norm import rms_norm
from glmc.ops.rotary import rotary
from glmc.ops.swiglu import swiglu

__all__ = ["add_rms_norm", "attention", "embedding_int8", "geglu", "linear_nbits", "rms_norm", "rotary", "swiglu"]
