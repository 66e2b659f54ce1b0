"""--target rocm[:gfx906,gfx90a,gfx942]: AMD GPUs and Hygon DCU (gfx906 class), the same
Triton kernels AOT-compiled to hsaco for wave64."""

from glmc.backends.gpu import load, lower

__all__ = ["lower", "load"]
