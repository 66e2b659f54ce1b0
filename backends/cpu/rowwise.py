"""The row-wise pieces of a decode step as TVM kernels: what is left between glmc's linears
and attention in a split step (backends/cpu/runtime16.py) once those run as glmc's kernels.

  skip_norm  onnxruntime's SkipSimplifiedLayerNormalization (its outputs 0 and 3):
             s = x + skip;  y = s / sqrt(mean(s^2) + eps) * gamma      -> y, s
  swiglu     Split in two halves a, b + Sigmoid + Mul + Mul:
             y = a * sigmoid(a) * b

Why: each onnxruntime piece a decode step runs costs a session run (~25-40 us here, most of
it not arithmetic); small-glm's int4 step ran 26 of them, 0.6-0.8 ms of a ~4.5 ms step (at
16 rows, a server's batch: 2.8 ms, 1.1 ms with the kernels). Up to MAX_ROWS rows (a decode
step's batch) the kernels are serial: a few thousand elements a row cost less than waking a
thread pool. Prompts run a parallel twin of each, the rows cut into one range per TVM
worker: onnxruntime's Split / Sigmoid / Mul pieces took 7.3 ms and its norms 3.1 ms of a
small-glm int4 128-token prefill (83 ms); the kernels take 2.4 and 2.3 ms, and the prompt
68 ms with the runtime's other savings (`python bench/prefill_profile.py ARTIFACT`).
"""

from __future__ import annotations

import functools

import numpy as np

from glmc.backends.cpu.attention import LANES, exp8
from glmc.backends.cpu.linear16 import available
from glmc.backends.cpu.tvm_build import built, host_target, prim_func
from glmc.errors import GlmcError
from glmc.settings import tvm_thread_pool

MAX_ROWS = 16       # the most rows the serial kernels take: a decode step's batch (at 16 rows of small-glm
                    # still cheaper than an onnxruntime piece); more rows run the parallel twin
PARALLEL = "_parallel"


def _skip_norm(H: int, eps: float, name: str, tasks: int = 1):
    """tasks 1: serial over the rows; else a parallel loop of `tasks` row ranges."""
    from tvm.script import tirx as T

    L, NV = LANES, H // LANES
    loop = T.serial if tasks == 1 else T.parallel

    @prim_func
    def skip_norm(x_handle: T.handle, skip_handle: T.handle, g_handle: T.handle, y_handle: T.handle,
                  s_handle: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        M = T.int32()
        X = T.match_buffer(x_handle, (M, H), "float32")
        SKIP = T.match_buffer(skip_handle, (M, H), "float32")
        GAMMA = T.match_buffer(g_handle, (H,), "float32")
        Y = T.match_buffer(y_handle, (M, H), "float32")
        S = T.match_buffer(s_handle, (M, H), "float32")
        for t in loop(tasks):
            acc = T.alloc_buffer((L,), "float32", scope="local")
            for m in T.serial(t * M // tasks, (t + 1) * M // tasks):
                acc[T.ramp(0, 1, L)] = T.broadcast(T.float32(0), L)
                for v in range(NV):
                    s = X[m, T.ramp(v * L, 1, L)] + SKIP[m, T.ramp(v * L, 1, L)]
                    S[m, T.ramp(v * L, 1, L)] = s
                    acc[T.ramp(0, 1, L)] = acc[T.ramp(0, 1, L)] + s * s
                inv = T.float32(1) / T.sqrt((acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7])
                                            / T.float32(H) + T.float32(eps))
                for v in range(NV):
                    Y[m, T.ramp(v * L, 1, L)] = S[m, T.ramp(v * L, 1, L)] * T.broadcast(inv, L) \
                        * GAMMA[T.ramp(v * L, 1, L)]

    return skip_norm


def _swiglu(F: int, name: str, tasks: int = 1):
    """tasks as for _skip_norm."""
    from tvm.script import tirx as T

    L, NV = LANES, F // LANES
    loop = T.serial if tasks == 1 else T.parallel

    @prim_func
    def swiglu(x_handle: T.handle, y_handle: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        M = T.int32()
        X = T.match_buffer(x_handle, (M, 2 * F), "float32")
        Y = T.match_buffer(y_handle, (M, F), "float32")
        for t in loop(tasks):
            for m in T.serial(t * M // tasks, (t + 1) * M // tasks):
                for v in range(NV):
                    a = X[m, T.ramp(v * L, 1, L)]
                    Y[m, T.ramp(v * L, 1, L)] = a / (T.broadcast(T.float32(1), L)
                                                     + exp8(T, T.broadcast(T.float32(0), L) - a)) \
                        * X[m, T.ramp(F + v * L, 1, L)]

    return swiglu


def supported(width: int) -> str | None:
    return None if width % LANES == 0 else f"width {width} is not a multiple of {LANES}"


class RowKernels:
    """The kernels for a step's norms (hidden width H, epsilon) and SwiGLUs (width F)."""

    def __init__(self, norms, swiglus, threads: int):
        why = available()
        if why:
            raise GlmcError(f"glmc's row-wise cpu kernels cannot run here: {why}")
        import tvm

        norms, swiglus = tuple(sorted(set(norms))), tuple(sorted(set(swiglus)))
        tasks = tvm_thread_pool(threads)
        makers = {}
        for suffix, n in (("", 1), (PARALLEL, tasks)):
            makers |= {self.norm_name(H, eps) + suffix: functools.partial(_skip_norm, H, eps, tasks=n)
                       for H, eps in norms}
            makers |= {f"swiglu_{F}{suffix}": functools.partial(_swiglu, F, tasks=n) for F in swiglus}
        self._lib = built(("rowwise", norms, swiglus), lambda: {name: make(name) for name, make in makers.items()},
                          threads, host_target(threads))
        self._fn = {name: self._lib[name] for name in makers}
        self._wrap = tvm.runtime.from_dlpack

    @staticmethod
    def norm_name(H: int, eps: float) -> str:
        return f"skip_norm_{H}_e{np.float32(eps).view(np.uint32)}"

    def _kernel(self, name: str, rows: int):
        return self._fn[name if rows <= MAX_ROWS else name + PARALLEL]

    def skip_norm(self, x, skip, gamma, y, s, eps: float):
        """y, s = norm(x + skip) * gamma, x + skip as a call of no arguments; (M, H) fp32
        arrays, ALIGN-aligned (rows past MAX_ROWS: the parallel kernel)."""
        fn = self._kernel(self.norm_name(x.shape[1], eps), x.shape[0])
        args = tuple(self._wrap(a) for a in (x, skip, gamma, y, s))
        return lambda: fn(*args)

    def swiglu(self, x, y):
        """y = silu(x[:, :F]) * x[:, F:] as a call of no arguments; x (M, 2F), y (M, F)."""
        fn = self._kernel(f"swiglu_{y.shape[1]}", x.shape[0])
        args = (self._wrap(x), self._wrap(y))
        return lambda: fn(*args)
