"""GPU backend shared by --target cuda and --target rocm: the rewritten graph as JSON
run by torch on the device, glmc ops through Triton kernels compiled ahead of time."""

from glmc.backends.gpu.lower import lower
from glmc.backends.gpu.runtime import load

__all__ = ["lower", "load"]
