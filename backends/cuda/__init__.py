"""--target cuda[:sm_80,sm_90]: NVIDIA GPUs, Triton kernels AOT-compiled to cubin."""

from glmc.backends.gpu import load, lower

__all__ = ["lower", "load"]
