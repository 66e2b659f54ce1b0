"""Triton kernels shared by the cuda and rocm backends: one op per file, each
with its `@triton.jit` kernel, its launcher and its config spaces
(`configs_cuda()`, `configs_rocm()`). The reference for every kernel is the
glmc op of the same name (glmc/ops/).

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (tests),
and cross-compile ahead of time for NVIDIA and AMD archs (glmc.backends.triton.aot).
"""
