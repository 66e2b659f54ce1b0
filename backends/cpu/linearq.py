"""Quantized weight linears on the CPU as TVM kernels (int4 and int8 weights), computed in
integers the way onnxruntime's MatMulNBits does at accuracy level 4: each row of x is
quantized to int8 per group of inputs (scale = max|x| / 127), the products of weight codes
and int8 inputs are summed with AVX2's vpmaddubsw (u8 x s8 pairs into 16 bits) and vpmaddwd
(into 32 bits), and each group's integer sum is scaled in fp32.

int4 (glmc's symmetric int4: value = (code - 8) * scale, a scale per `block` inputs):

    y[n] = sum_g  s_w[n, g] * ( sx[g] * sum_k code[n, k] xq[k]  -  8 * sx[g] * sum_k xq[k] )

int8 (value = w * scale, w in [-127, 127], one scale per output column): vpmaddubsw takes its
first operand unsigned, so it multiplies |w| by xq with w's sign moved onto xq (vpsignb);
its pair sums stay below 2 * 127 * 127 < 2^15:

    y[n] = s_w[n] * sum_g sx[g] * sum_k |w[n, k]| sign(w[n, k]) xq[k]

Why glmc has its own: on the GLM-4-9B shapes, 2 threads, the int4 kernels ran one row 1.18x
and 16-64 rows 2.1-2.6x faster than MatMulNBits in the same run (group 128,
bench/results/linearq-glm4-9b-cpu.json); on small shapes (K = 1024) a call's fixed cost
makes one row 0.87x (bench/results/linearq-small-glm-cpu.json). They run where 16-bit
linears run: as glmc.cpu::Linear4 / Linear8 nodes of the step graph, cut out of it by
backends/cpu/runtime16.py.

Layout. Output columns go in blocks of V (32; 16 or 8 where the output width needs it),
each block as V / 8 sub-blocks of 8 columns, a sub-block's inputs in 32-byte vectors of 8
columns x 4 inputs (byte 4c + i: column c, input i), each the operand of one vpmaddubsw
against 4 inputs of x broadcast to all 8 columns.
  int4: for each 8 inputs k = 8p .. 8p+7, 32 bytes: byte 4c + i holds column c's code of
        input 8p + i in its low nibble and of input 8p + 4 + i in its high nibble (one load,
        masked and shifted, gives two vectors)
            codes   uint8 (N / V, K / 8, V / 8, 32)
            scales  fp32  (N / V, K / block, V)
        The 16-bit partial sums hold 8 vpmaddubsw results (|sum| <= 8 * 2 * 15 * 128 < 2^15)
        and are widened every 32 inputs.
  int8: for each 4 inputs k = 4q .. 4q+3, 32 bytes: byte 4c + i is column c's w of input 4q + i
            codes   int8  (N / V, K / 4, V / 8, 32)
            scales  fp32  (N / V, blocks, V)      (glmc's int8 scales repeat over the blocks;
                                                   the kernels read block 0)
        widened after every vpmaddubsw; x quantized per `x_group(K)` inputs.

Kernels per (K, N, group, bits):
  quantize  x (M, K) fp32 -> xq int8 (M, K), sx and sx * sum(xq) per (row, group)
  gemv      1..GEMV_MAX_M rows, parallel over column blocks, all V columns at once
  gemm      rows in tiles of 8 (or 4: `tile_rows`), one sub-block at a time, its sums for the
            tile's rows held in registers over all of K (prefill, batched decode). 8 rows share
            each weight vector's load and unpacking: small-glm's decoder linears, weights
            cold, 2 threads, one process alternating, 8 rows over 4: 1.07x / 1.08x / 1.08x at
            32 / 128 / 512 rows (medians; 225 -> 241, 239 -> 259, 238 -> 257 GMAC/s; a one-off
            script); whole prompts: bench/results/prefill-gemm8-ab-small-glm.json

Each kernel's parallel loop has one task per TVM worker (TVM_NUM_THREADS), over a contiguous
range of its column blocks (gemm: (block, row tile) pairs), with its buffers allocated once per
task. TVM allocates the buffers of a parallel loop's body from its workspace pool
(TVMBackendAllocWorkspace) on every iteration, so a task per 32-column block paid that per
block: one task per worker made the 9B-shape int4 gemv 1.08x, small-glm's int4 linears
1.19-1.25x (1, 4, 16 rows) and its int8 lm_head 1.08-1.13x faster (medians,
bench/results/linearq-tasks-cpu.json).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from glmc.backends.cpu.linear16 import ALIGN, aligned_empty, available, block_width  # noqa: F401
from glmc.backends.cpu.tvm_build import built, cpu_features, host_target, prim_func
from glmc.errors import GlmcError
from glmc.settings import tvm_thread_pool
from glmc.weights import RowLayout

GEMV_MAX_M = 2
ROWS = (8, 4)          # gemm row tiles: the larger where it pads no more rows than the smaller
ZERO = 8              # the implicit zero point of symmetric int4 codes


def x_group(K: int) -> int | None:
    """The inputs per activation scale of an int8 linear over K inputs (its weights have one
    scale per column, so any group works): 128, 64 or 32, the largest dividing K."""
    return next((g for g in (128, 64, 32) if K % g == 0), None)


def runnable(threads: int = 1) -> str | None:
    """Why these kernels cannot run on this machine (no TVM, a CPU without AVX2), or None."""
    from glmc.backends.cpu import linear16

    why = linear16.available()
    if why:
        return why
    target = host_target(threads)
    if "avx2" not in cpu_features(target):
        return f"glmc's quantized cpu kernels need AVX2; this CPU ({target.attrs['mcpu']}) has none"
    return None


def supported(K: int, N: int, block: int, bits: int = 4) -> str | None:
    """Why a (K, N, block) linear of `bits`-bit weights cannot run as these kernels, or None
    (int8: block is x_group(K))."""
    if bits == 8 and x_group(K) is None:
        return f"the input width {K} is not a multiple of 32"
    if block % 32:
        return f"group size {block} is not a multiple of 32"
    if K % block:
        return f"the input width {K} is not a multiple of the group size {block}"
    if block_width(N) is None:
        return f"the output width {N} is not a multiple of 8"
    return None


def tile_rows(M: int) -> int:
    """The gemm's row tile for M rows: 8 where rounding M up to 8 pads no more than rounding it
    up to 4 (M mod 8 in 0, 5, 6, 7), else 4."""
    big, small = ROWS
    return big if -(-M // big) * big == -(-M // small) * small else small


def padded_rows(M: int) -> int:
    """The rows a call of M rows computes: M for the gemv, M rounded up to its row tile for the gemm."""
    if M <= GEMV_MAX_M:
        return M
    R = tile_rows(M)
    return -(-M // R) * R


def pack_codes(codes, width: int | None = None):
    """(N, K) codes in [0, 15] -> (N / V, K / 8, V / 8, 32) bytes in the layout above; V =
    width, by default block_width(N)."""
    N, K = codes.shape
    V = width or block_width(N)
    c = codes.reshape(N // V, V // 8, 8, K // 8, 2, 4)              # block, sub, column, p, half, i
    c = c.permute(0, 3, 1, 4, 2, 5)
    return (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(N // V, K // 8, V // 8, 32)


def pack_codes8(w, width: int | None = None):
    """(N, K) int8 weights -> (N / V, K / 4, V / 8, 32) in the int8 layout; V = width, by
    default block_width(N)."""
    N, K = w.shape
    V = width or block_width(N)
    c = w.reshape(N // V, V // 8, 8, K // 4, 4)                     # block, sub, column, q, i
    c = c.permute(0, 3, 1, 2, 4)
    return c.reshape(N // V, K // 4, V // 8, 32)


def pack_scales(scales):
    """(N, K / block) -> (N / V, K / block, V)."""
    N, G = scales.shape
    V = block_width(N)
    s = scales.reshape(N // V, V, G)
    return s.permute(0, 2, 1).reshape(N // V, G, V)


def _quantize(K: int, block: int, name: str, workers: int, parallel: bool = True):
    """Serial (parallel=False) for a decode step's row or two: waking the thread pool for K
    inputs costs more than quantizing them."""
    from tvm.script import tirx as T

    NG = K // block
    loop = T.parallel if parallel else T.serial
    tasks = workers if parallel else 1

    @prim_func
    def quantize(x_handle: T.handle, q_handle: T.handle, sx_handle: T.handle, ss_handle: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        M = T.int32()
        X = T.match_buffer(x_handle, (M, K), "float32")
        Q = T.match_buffer(q_handle, (M, K), "int8")
        SX = T.match_buffer(sx_handle, (M, NG), "float32")
        SS = T.match_buffer(ss_handle, (M, NG), "float32")
        for t in loop(tasks):
            amax = T.alloc_buffer((8,), "float32", scope="local")
            acc = T.alloc_buffer((8,), "int32", scope="local")
            for mg in T.serial(t * (M * NG) // tasks, (t + 1) * (M * NG) // tasks):
                m = mg // NG
                k0 = mg % NG * block
                amax[T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
                acc[T.ramp(0, 1, 8)] = T.broadcast(T.int32(0), 8)
                for v in range(block // 8):
                    amax[T.ramp(0, 1, 8)] = T.max(amax[T.ramp(0, 1, 8)], T.abs(X[m, T.ramp(k0 + v * 8, 1, 8)]))
                for i in range(1, 8):
                    amax[0] = T.max(amax[0], amax[i])
                inv = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
                for v in range(block // 8):
                    q = T.Cast("int32x8", T.round(X[m, T.ramp(k0 + v * 8, 1, 8)] * T.broadcast(inv, 8)))
                    Q[m, T.ramp(k0 + v * 8, 1, 8)] = T.Cast("int8x8", q)
                    acc[T.ramp(0, 1, 8)] = acc[T.ramp(0, 1, 8)] + q
                for i in range(1, 8):
                    acc[0] = acc[0] + acc[i]
                SX[m, mg % NG] = amax[0] / T.float32(127)
                SS[m, mg % NG] = amax[0] / T.float32(127) * T.Cast("float32", acc[0])

    return quantize


def _madd(T, w, x):
    """16 sums of two u8 x s8 products (vpmaddubsw)."""
    return T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", w, x)


def _widen(T, a):
    """8 sums of two int16 (vpmaddwd against ones)."""
    return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", a, T.broadcast(T.int16(1), 16))


def _signed_madd(T, w, x):
    """vpmaddubsw of |w| (vpabsb) and x carrying w's sign (vpsignb): 16 sums of two w * x
    products (int8 w, x)."""
    return _madd(T, T.call_llvm_pure_intrin("int8x32", "llvm.abs.v32i8", w, T.bool(False)),
                 T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", x, w))


def _weights(T, NB: int, K: int, SB: int, bits: int):
    """The codes' buffer type: (N / V, K / 8, V / 8, 32) uint8 (int4) or (N / V, K / 4, V / 8, 32) int8."""
    return T.Buffer((NB, K * bits // 32, SB, 32), "uint8" if bits == 4 else "int8")


def _gemv(K: int, N: int, block: int, name: str, tasks: int, bits: int = 4):
    """All V columns of a block at once, one row after another."""
    from tvm.script import tirx as T

    V = block_width(N)
    SB, NB, NG = V // 8, N // V, K // block

    @prim_func
    def gemv(q_handle: T.handle, sx_handle: T.handle, ss_handle: T.handle, W: _weights(T, NB, K, SB, bits),
             s_handle: T.handle, y_handle: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        M = T.int32()
        SG = T.int32()
        X = T.match_buffer(q_handle, (M, K // 4), "int32")       # 4 int8 inputs per element
        SX = T.match_buffer(sx_handle, (M, NG), "float32")
        SS = T.match_buffer(ss_handle, (M, NG), "float32")
        S = T.match_buffer(s_handle, (NB, SG, V), "float32")
        Y = T.match_buffer(y_handle, (M, N), "float32")
        for t in T.parallel(tasks):
            accf = T.alloc_buffer((V,), "float32", scope="local")
            acc32 = T.alloc_buffer((V,), "int32", scope="local")
            acc16 = T.alloc_buffer((SB * 16,), "int16", scope="local")
            for nb in T.serial(t * NB // tasks, (t + 1) * NB // tasks):
                for m in range(M):
                    for j in T.unroll(SB):
                        accf[T.ramp(j * 8, 1, 8)] = T.broadcast(T.float32(0), 8)
                    for g in range(NG):
                        for j in T.unroll(SB):
                            acc32[T.ramp(j * 8, 1, 8)] = T.broadcast(T.int32(0), 8)
                        for s in range(block // 32):            # 32 inputs at a time
                            if bits == 4:
                                for j in T.unroll(SB):
                                    acc16[T.ramp(j * 16, 1, 16)] = T.broadcast(T.int16(0), 16)
                                for p in T.unroll(4):
                                    k8 = g * (block // 8) + s * 4 + p
                                    xa = T.reinterpret("int8x32", T.broadcast(X[m, k8 * 2], 8))
                                    xb = T.reinterpret("int8x32", T.broadcast(X[m, k8 * 2 + 1], 8))
                                    for j in T.unroll(SB):
                                        w = W[nb, k8, j, T.ramp(0, 1, 32)]
                                        acc16[T.ramp(j * 16, 1, 16)] = acc16[T.ramp(j * 16, 1, 16)] \
                                            + _madd(T, w & T.broadcast(T.uint8(15), 32), xa) \
                                            + _madd(T, w >> T.broadcast(T.uint8(4), 32), xb)
                                for j in T.unroll(SB):
                                    acc32[T.ramp(j * 8, 1, 8)] = acc32[T.ramp(j * 8, 1, 8)] \
                                        + _widen(T, acc16[T.ramp(j * 16, 1, 16)])
                            else:
                                for i in T.unroll(8):
                                    q = g * (block // 4) + s * 8 + i
                                    xq = T.reinterpret("int8x32", T.broadcast(X[m, q], 8))
                                    for j in T.unroll(SB):
                                        acc32[T.ramp(j * 8, 1, 8)] = acc32[T.ramp(j * 8, 1, 8)] \
                                            + _widen(T, _signed_madd(T, W[nb, q, j, T.ramp(0, 1, 32)], xq))
                        for j in T.unroll(SB):
                            if bits == 4:
                                accf[T.ramp(j * 8, 1, 8)] = accf[T.ramp(j * 8, 1, 8)] + S[nb, g, T.ramp(j * 8, 1, 8)] * (
                                    T.Cast("float32x8", acc32[T.ramp(j * 8, 1, 8)]) * T.broadcast(SX[m, g], 8)
                                    - T.broadcast(SS[m, g] * T.float32(ZERO), 8))
                            else:
                                accf[T.ramp(j * 8, 1, 8)] = accf[T.ramp(j * 8, 1, 8)] \
                                    + T.Cast("float32x8", acc32[T.ramp(j * 8, 1, 8)]) * T.broadcast(SX[m, g], 8)
                    for j in T.unroll(SB):
                        if bits == 4:
                            Y[m, T.ramp(nb * V + j * 8, 1, 8)] = accf[T.ramp(j * 8, 1, 8)]
                        else:
                            Y[m, T.ramp(nb * V + j * 8, 1, 8)] = accf[T.ramp(j * 8, 1, 8)] * S[nb, 0, T.ramp(j * 8, 1, 8)]

    return gemv


def _gemm(K: int, N: int, block: int, name: str, tasks: int, bits: int = 4, R: int = ROWS[0]):
    """R rows x one sub-block of 8 columns at a time, over all of K."""
    from tvm.script import tirx as T

    V = block_width(N)
    SB, NB, NG = V // 8, N // V, K // block

    @prim_func
    def gemm(q_handle: T.handle, sx_handle: T.handle, ss_handle: T.handle, W: _weights(T, NB, K, SB, bits),
             s_handle: T.handle, y_handle: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        MQ = T.int32()
        SG = T.int32()
        X = T.match_buffer(q_handle, (MQ, R, K // 4), "int32")
        SX = T.match_buffer(sx_handle, (MQ, R, NG), "float32")
        SS = T.match_buffer(ss_handle, (MQ, R, NG), "float32")
        S = T.match_buffer(s_handle, (NB, SG, V), "float32")
        Y = T.match_buffer(y_handle, (MQ, R, N), "float32")
        for t in T.parallel(tasks):
            accf = T.alloc_buffer((R * 8,), "float32", scope="local")
            accg = T.alloc_buffer((R * 8,), "int32", scope="local")
            acc16 = T.alloc_buffer((R * 16,), "int16", scope="local")
            for task in T.serial(t * (NB * MQ) // tasks, (t + 1) * (NB * MQ) // tasks):
                nb = task // MQ
                mq = task % MQ
                for j in range(SB):
                    for r in T.unroll(R):
                        accf[T.ramp(r * 8, 1, 8)] = T.broadcast(T.float32(0), 8)
                    for g in range(NG):
                        for r in T.unroll(R):
                            accg[T.ramp(r * 8, 1, 8)] = T.broadcast(T.int32(0), 8)
                        for s in range(block // 32):
                            if bits == 4:
                                for r in T.unroll(R):
                                    acc16[T.ramp(r * 16, 1, 16)] = T.broadcast(T.int16(0), 16)
                                for p in T.unroll(4):
                                    k8 = g * (block // 8) + s * 4 + p
                                    w = W[nb, k8, j, T.ramp(0, 1, 32)]
                                    for r in T.unroll(R):
                                        acc16[T.ramp(r * 16, 1, 16)] = acc16[T.ramp(r * 16, 1, 16)] \
                                            + _madd(T, w & T.broadcast(T.uint8(15), 32),
                                                    T.reinterpret("int8x32", T.broadcast(X[mq, r, k8 * 2], 8))) \
                                            + _madd(T, w >> T.broadcast(T.uint8(4), 32),
                                                    T.reinterpret("int8x32", T.broadcast(X[mq, r, k8 * 2 + 1], 8)))
                                for r in T.unroll(R):
                                    accg[T.ramp(r * 8, 1, 8)] = accg[T.ramp(r * 8, 1, 8)] \
                                        + _widen(T, acc16[T.ramp(r * 16, 1, 16)])
                            else:
                                for i in T.unroll(8):
                                    q = g * (block // 4) + s * 8 + i
                                    w = W[nb, q, j, T.ramp(0, 1, 32)]
                                    for r in T.unroll(R):
                                        accg[T.ramp(r * 8, 1, 8)] = accg[T.ramp(r * 8, 1, 8)] + _widen(T, _signed_madd(
                                            T, w, T.reinterpret("int8x32", T.broadcast(X[mq, r, q], 8))))
                        for r in T.unroll(R):
                            if bits == 4:
                                accf[T.ramp(r * 8, 1, 8)] = accf[T.ramp(r * 8, 1, 8)] + S[nb, g, T.ramp(j * 8, 1, 8)] * (
                                    T.Cast("float32x8", accg[T.ramp(r * 8, 1, 8)]) * T.broadcast(SX[mq, r, g], 8)
                                    - T.broadcast(SS[mq, r, g] * T.float32(ZERO), 8))
                            else:
                                accf[T.ramp(r * 8, 1, 8)] = accf[T.ramp(r * 8, 1, 8)] \
                                    + T.Cast("float32x8", accg[T.ramp(r * 8, 1, 8)]) * T.broadcast(SX[mq, r, g], 8)
                    for r in T.unroll(R):
                        if bits == 4:
                            Y[mq, r, T.ramp(nb * V + j * 8, 1, 8)] = accf[T.ramp(r * 8, 1, 8)]
                        else:
                            Y[mq, r, T.ramp(nb * V + j * 8, 1, 8)] = accf[T.ramp(r * 8, 1, 8)] * S[nb, 0, T.ramp(j * 8, 1, 8)]

    return gemm


def _name(kind: str, K: int, N: int, block: int, bits: int = 4) -> str:
    return f"{kind}_q{bits}_{K}x{N}_g{block}"


def _makers(shapes, tasks: int) -> dict:
    """name -> a function making that kernel's prim_func, for (K, N, block, bits) `shapes`:
    quantize (parallel and serial) per (K, block), gemv and gemm per shape, each parallel loop
    cut into `tasks` tasks. The names alone are what a load from the cache needs."""
    makers = {}
    for K, N, block, bits in shapes:
        for parallel in (True, False):
            name = f"quantize_{K}_g{block}" + ("" if parallel else "_serial")
            makers[name] = functools.partial(_quantize, K, block, name, tasks, parallel)
        name = _name("gemv", K, N, block, bits)
        makers[name] = functools.partial(_gemv, K, N, block, name, tasks, bits)
        for R in ROWS:
            name = _name(f"gemm{R}", K, N, block, bits)
            makers[name] = functools.partial(_gemm, K, N, block, name, tasks, bits, R)
    return makers


class Kernels:
    """The compiled kernels for a set of (K, N, block, bits) shapes (int8: block = x_group(K));
    the same calls as linear16.Kernels, a weight being the pair (codes, scales) in the layout
    above (int8 codes are int8, int4 codes uint8)."""

    def __init__(self, shapes, threads: int):
        why = available()
        if why:
            raise GlmcError(f"this artifact has quantized linears run by glmc's kernels, which {why}")
        why = runnable(threads)
        if why:
            raise GlmcError(why)
        import tvm

        shapes = tuple(sorted(set(shapes)))
        for K, N, block, bits in shapes:
            why = supported(K, N, block, bits)
            if why:
                raise GlmcError(f"an int{bits} linear of {K} x {N}, group {block}, cannot run as glmc's kernel: {why}")
        target = host_target(threads)
        makers = _makers(shapes, tvm_thread_pool(threads))
        self._lib = built(("linearq", shapes), lambda: {name: make() for name, make in makers.items()}, threads, target)
        self._fn = {name: self._lib[name] for name in makers}
        self._wrap = tvm.runtime.from_dlpack

    def tensor(self, weight):
        """The kernels' view of a weight (codes, scales): ALIGN-aligned C-contiguous arrays (no copy)."""
        codes, scales = weight
        if codes.dtype == np.int8:
            K = int(codes.shape[1]) * 4
            return self._wrap(codes), self._wrap(scales), x_group(K), 8
        return self._wrap(codes), self._wrap(scales), int(codes.shape[1]) * 8 // int(scales.shape[1]), 4

    def bound(self, x: np.ndarray, w, y: np.ndarray, M: int):
        """The call y[:M] = x[:M] @ W^T as a function of no arguments, its views and the
        quantized rows' buffers made once. x (>= M', K), y (>= M', N): ALIGN-aligned fp32;
        w a `tensor` view; M' = padded_rows(M) (the padding rows are computed and ignored)."""
        codes, scales, block, bits = w
        K, N = x.shape[1], y.shape[1]
        Mp = padded_rows(M)
        NG = K // block
        q = aligned_empty((Mp, K), np.int8)
        sx, ss = aligned_empty((Mp, NG), np.float32), aligned_empty((Mp, NG), np.float32)
        wrap = self._wrap
        quantize = self._fn[f"quantize_{K}_g{block}" + ("_serial" if M <= GEMV_MAX_M else "")]
        qargs = (wrap(x[:Mp]), wrap(q), wrap(sx), wrap(ss))
        if M <= GEMV_MAX_M:
            fn = self._fn[_name("gemv", K, N, block, bits)]
            args = (wrap(q.view(np.int32)), wrap(sx), wrap(ss), codes, scales, wrap(y[:M]))
        else:
            R = tile_rows(M)
            fn = self._fn[_name(f"gemm{R}", K, N, block, bits)]
            args = (wrap(q.view(np.int32).reshape(Mp // R, R, K // 4)), wrap(sx.reshape(Mp // R, R, NG)),
                    wrap(ss.reshape(Mp // R, R, NG)), codes, scales, wrap(y[:Mp].reshape(Mp // R, R, N)))

        def call(keep=(q, sx, ss)):
            quantize(*qargs)
            fn(*args)
        return call

    @staticmethod
    def padded_rows(M: int) -> int:
        return padded_rows(M)

    def linear(self, x: np.ndarray, w, y: np.ndarray, M: int) -> None:
        """y[:M] = x[:M] @ W^T (see `bound`)."""
        self.bound(x, w, y, M)()


def codes_layout(qweight_rows: torch.Tensor, K: int, width: int) -> torch.Tensor:
    """glmc.quant's int4 codes, rows (n, blocks, block / 2) packed low nibble first, as this
    module's (n / width, K / 8, width / 8, 32) layout (n a multiple of width)."""
    low, high = qweight_rows & 0x0F, qweight_rows >> 4
    codes = torch.stack((low, high), dim=-1).reshape(qweight_rows.shape[0], -1)[:, :K]
    return pack_codes(codes, width)


def codes8_layout(qweight_rows: torch.Tensor, K: int, width: int) -> torch.Tensor:
    """glmc.quant's int8 codes (w + 128), rows (n, blocks, block), as the int8 layout
    (n / width, K / 4, width / 8, 32)."""
    w = (qweight_rows.reshape(qweight_rows.shape[0], -1)[:, :K].to(torch.int16) - 128).to(torch.int8)
    return pack_codes8(w, width)


@dataclass(eq=False)
class Codes(RowLayout):
    """Recipe: glmc.quant's `bits`-bit codes (N, blocks, block * bits / 8) in this module's
    layout for them (`codes_layout` / `codes8_layout`)."""

    K: int
    bits: int

    def __post_init__(self):
        N, per_byte = self.x.shape[0], 8 // self.bits            # inputs per 32-byte vector: 8 (int4), 4 (int8)
        self.shape = (N // self.width, self.K // (4 * per_byte), self.width // 8, 32)
        self.dtype = torch.uint8 if self.bits == 4 else torch.int8

    @property
    def key(self):
        return ("codes", self.x.key, self.K, self.width, self.bits)

    def lay(self, rows):
        return (codes_layout if self.bits == 4 else codes8_layout)(rows, self.K, self.width)
