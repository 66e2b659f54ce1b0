"""16-bit and fp32 weight linears on the CPU: y = x W^T with W stored bf16, fp16 or fp32 and
computed in fp32, as TVM kernels built for this machine's CPU when an artifact is loaded.

fp32 (--fp32-matmul glmc, the default for unquantized fp32 builds with 128 MiB of linears or
more): onnxruntime's MatMul
streams its pre-packed copy of a weight more slowly at one row than these kernels stream the
block layout. Measured on small-glm's linears, one process alternating (2026-12-07): 48.3
against 38.2 GB/s, and 32.7 against 31.1 when the host's bandwidth sat at its low level; at
128 rows the two matched (100.7 against 97.5 GMAC/s). The kernels read one copy of the
artifact's weights, on 2 MB pages where the system has them (glmc/hugepages.py), as stored:
no re-packing.

onnxruntime has no fast 16-bit matmul on CPUs without AVX-512 BF16 / FP16 (measured with
bench/cpu_16bit.py: its fp16 MatMul runs at 0.85x fp32, bf16 has no CPU kernel), and a
custom op inside its graph needs its C API headers, which the wheel does not ship. So a
16-bit artifact's step graph is cut at its linears (backends/cpu/runtime16.py) and these
kernels run between the pieces.

Layout: W (N, K) is stored as (N / V, K, V): block `no` holds output columns
no*V .. no*V+V-1, one row of V per k (V = 32; 16 or 8 for an output width that is not a
multiple of 32, e.g. a vocabulary of 1000). A kernel streams each block once per call, converts
its V values per k to fp32 (bf16: a 16-bit shift; fp16: F16C's vcvtph2ps) and keeps the
(rows x V) sums in registers (V = 32 is four 8-wide fp32 vectors). Two schedules per
shape, both parallel over the column blocks:
  gemv  any M, one row at a time: each block read once per row (decode, M <= GEMV_MAX_M)
  gemm  M a multiple of the tile's rows: each converted weight vector feeds those rows
        (prefill, batched decode); sums held for a rows x columns tile (TILES), so the
        register file holds them

The gemm's tile by stored dtype (TILES): fp32 3 rows x 32 columns, 16-bit 6 x 16. With 6 x
16, fp32 read half of each 128-byte weight row per pass over k, so a block's first pass
missed twice as often, and 32 rows padded to 36; 3 x 32 reads whole rows. Measured on
small-glm's 40 decoder linears, weights cold, 2 threads (GMAC/s at 12 / 32 / 128 / 512 rows):
fp32 58 / 78 / 103 / 110 at 6 x 16, 67 / 90 / 104 / 109 at 3 x 32. bf16 and fp16 convert each
weight vector once per tile, so 3 x 32 costs them (bf16 76 / 85 / 103 / 108 at 6 x 16, 69 /
76 / 81 / 83 at 3 x 32).
"""

from __future__ import annotations

import math

import numpy as np

from glmc.backends.cpu.tvm_build import built
from glmc.errors import GlmcError

V = 32                 # output columns per block: the vector lanes one k step fills (fewer
                       # where the output width is not a multiple of 32: `block_width`)
TILES = {"fp32": (3, 32), "bf16": (6, 16), "fp16": (6, 16)}     # gemm register tile: rows x columns of a
                       # block (12 ymm registers of sums), by stored dtype
GEMV_MAX_M = 2         # up to this many rows run the gemv (each row streams the weight once)
UNROLL = 4             # gemv: k steps unrolled in the inner loop
ALIGN = 64             # byte alignment TVM's kernels assume for every buffer
DTYPES = {"bf16": "uint16", "fp16": "float16", "fp32": "float32"}   # stored element type (bf16 travels as its bits)

def available() -> str | None:
    """Why 16-bit CPU linears cannot be built here, or None."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        return "needs Apache TVM: pip install 'glmc[cpu16]' (apache-tvm)"
    return None


def block_width(N: int) -> int | None:
    """The block width for an output width N: V, or 16 / 8 where N is not a multiple of V;
    None where N is not a multiple of 8."""
    return next((w for w in (V, 16, 8) if N % w == 0), None)


def padded_rows(M: int, dtype: str) -> int:
    """The rows a call of M rows computes: M for the gemv, M rounded up to the dtype's tile
    rows for the gemm."""
    rows = TILES[dtype][0]
    return M if M <= GEMV_MAX_M else -(-M // rows) * rows


def pack(w, dtype: str):
    """(N, K) fp32 weight -> (N / width, K, width) in the stored dtype (torch tensors: bf16
    rounds to nearest even), width = block_width(N)."""
    import torch

    rows, K = w.shape
    width = block_width(rows)
    blocks = w.reshape(rows // width, width, K).transpose(1, 2).contiguous()
    return blocks.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])


def aligned_empty(shape, dtype, zeros: bool = False) -> np.ndarray:
    """An uninitialised (`zeros`: zeroed, its pages untouched until used) array whose data
    starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = (np.zeros if zeros else np.empty)(n + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def _weight(W, dtype: str):
    from tvm import tirx

    def at(no, k, ni):
        w = W[no, k, ni]
        if dtype == "bf16":
            return tirx.reinterpret("float32", w.astype("uint32") << tirx.const(16, "uint32"))
        return w.astype("float32")

    return at


def _gemv(K: int, N: int, dtype: str, name: str):
    from tvm import s_tir, te

    width = block_width(N)
    M = te.var("m")
    X = te.placeholder((M, K), "float32", name="X")
    W = te.placeholder((N // width, K, width), DTYPES[dtype], name="W")
    w = _weight(W, dtype)
    k = te.reduce_axis((0, K), "k")
    Y = te.compute((M, N), lambda m, n: te.sum(X[m, k] * w(n // width, k, n % width), axis=k), name="Y")
    s = s_tir.Schedule(te.create_prim_func([X, W, Y]).with_attr("global_symbol", name))
    block = s.get_sblock("Y")
    m, n, kk = s.get_loops(block)
    no, ni = s.split(n, [N // width, width])
    s.reorder(no, m, kk, ni)
    s.parallel(no)
    acc = s.cache_write(block, 0, "local")
    s.reverse_compute_at(acc, m)
    ko, ki = s.split(kk, [None, UNROLL])
    s.unroll(ki)
    s.vectorize(ni)
    s.decompose_reduction(block, ko)
    s.vectorize(s.get_loops(acc)[-1])
    return s.mod["main"].with_attr("global_symbol", name)


def _gemm(K: int, N: int, dtype: str, name: str):
    from tvm import s_tir, te

    width = block_width(N)
    rows, tile = TILES[dtype]
    tile = min(tile, width)
    Mq = te.var("mq")
    X = te.placeholder((Mq, rows, K), "float32", name="X")         # rows grouped a tile's rows at a time
    W = te.placeholder((N // width, K, width), DTYPES[dtype], name="W")
    w = _weight(W, dtype)
    k = te.reduce_axis((0, K), "k")
    Y = te.compute((Mq, rows, N), lambda mo, mi, n: te.sum(X[mo, mi, k] * w(n // width, k, n % width), axis=k),
                   name="Y")
    s = s_tir.Schedule(te.create_prim_func([X, W, Y]).with_attr("global_symbol", name))
    block = s.get_sblock("Y")
    mo, mi, n, kk = s.get_loops(block)
    no, ni = s.split(n, [N // width, width])
    nio, nii = s.split(ni, [width // tile, tile])
    s.reorder(no, mo, nio, kk, mi, nii)
    s.parallel(no)
    acc = s.cache_write(block, 0, "local")
    s.reverse_compute_at(acc, nio)
    s.unroll(mi)
    s.vectorize(nii)
    s.decompose_reduction(block, kk)
    mi_w, ni_w = s.get_loops(acc)[-2:]
    s.unroll(mi_w)
    s.vectorize(ni_w)
    return s.mod["main"].with_attr("global_symbol", name)


def _name(kind: str, K: int, N: int, dtype: str) -> str:
    return f"{kind}_{dtype}_{K}x{N}"


class Kernels:
    """The compiled kernels for a set of (K, N) shapes in one stored dtype; `linear(x, w, y)`."""

    def __init__(self, shapes, dtype: str, threads: int):
        why = available()
        if why:
            raise GlmcError(f"this artifact has {dtype} weights on the cpu target, which {why}")
        import tvm

        for K, N in shapes:
            if block_width(N) is None:
                raise GlmcError(f"a {dtype} cpu linear needs its output width to be a multiple of 8, got {N}")
        shapes = tuple(sorted(set(shapes)))
        names = {_name(kind, K, N, dtype): (make, K, N) for K, N in shapes for kind, make in (("gemv", _gemv),
                                                                                              ("gemm", _gemm))}
        self._lib = built(("linear16", dtype, shapes),
                          lambda: {name: make(K, N, dtype, name) for name, (make, K, N) in names.items()}, threads)
        self._fn = {name: self._lib[name] for name in names}
        self.dtype = dtype
        self._wrap = tvm.runtime.from_dlpack

    def tensor(self, a: np.ndarray):
        """A TVM view of an ALIGN-aligned C-contiguous array (no copy)."""
        return self._wrap(a)

    def bound(self, x: np.ndarray, w, y: np.ndarray, M: int):
        """The call y[:M] = x[:M] @ W^T as a function of no arguments, its views made once. x (>= M',
        K) and y (>= M', N): ALIGN-aligned fp32 buffers; w a `tensor` view of the packed weight
        (N / width, K, width). M' = padded_rows(M) (gemm: the padding rows are computed and
        ignored)."""
        K, N = x.shape[1], y.shape[1]
        if M <= GEMV_MAX_M:
            fn, xt, yt = self._fn[_name("gemv", K, N, self.dtype)], self._wrap(x[:M]), self._wrap(y[:M])
        else:
            Mp, rows = padded_rows(M, self.dtype), TILES[self.dtype][0]
            fn = self._fn[_name("gemm", K, N, self.dtype)]
            xt = self._wrap(x[:Mp].reshape(Mp // rows, rows, K))
            yt = self._wrap(y[:Mp].reshape(Mp // rows, rows, N))
        return lambda: fn(xt, w, yt)

    def padded_rows(self, M: int) -> int:
        return padded_rows(M, self.dtype)

    def linear(self, x: np.ndarray, w, y: np.ndarray, M: int) -> None:
        """y[:M] = x[:M] @ W^T (see `bound`)."""
        self.bound(x, w, y, M)()
