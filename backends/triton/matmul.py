"""y = x @ W^T + bias for fp16/bf16/fp32 activations with dense, int8
per-channel or int4 group-wise weights in glmc's packed format (glmc/quant.py:
uint8 (N, n_blocks, block*bits/8), codes low nibble first; fp32 scales
(N, n_blocks); optional packed zero points, else 2^(bits-1)).

Two kernels:
  _matmul_kernel   prefill GEMM: (BLOCK_M x BLOCK_N) tiles, GROUP_M swizzle,
                   fp32 accumulation. Quantized weights: the K tile lies inside
                   one quantization block, so the tile's integer codes (exact in
                   fp16/bf16) go through tl.dot and the block's scale multiplies
                   the fp32 partial product.
  _gemv_kernel     decode GEMV (few rows): each program streams a BLOCK_N x K
                   strip of the weight once; optional split-K (SPLIT_K programs
                   along K, fp32 atomic adds) to fill the GPU on narrow outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmc.backends.triton._common import Config, Launch, launch, check

GEMV_MAX_M = 4   # up to this many rows the decode GEMV runs, beyond it the GEMM


@triton.jit
def _dequant_tile(w_ptr, z_ptr, n, kk, nmask, kmask, stride_wn, zero_bytes,
                  WBITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
    """(len(n), len(kk)) integer codes minus their zero point, as fp32."""
    m2 = nmask[:, None] & kmask[None, :]
    if WBITS == 8:
        code = tl.load(w_ptr + n[:, None] * stride_wn + kk[None, :], mask=m2, other=0).to(tl.int32)
    else:
        byte = tl.load(w_ptr + n[:, None] * stride_wn + kk[None, :] // 2, mask=m2, other=0).to(tl.int32)
        code = (byte >> ((kk[None, :] % 2) * 4)) & 0xF
    blk = kk // GROUP
    if HAS_ZERO:
        if WBITS == 8:
            zp = tl.load(z_ptr + n[:, None] * zero_bytes + blk[None, :], mask=m2, other=0).to(tl.int32)
        else:
            zb = tl.load(z_ptr + n[:, None] * zero_bytes + blk[None, :] // 2, mask=m2, other=0).to(tl.int32)
            zp = (zb >> ((blk[None, :] % 2) * 4)) & 0xF
    else:
        zp = 1 << (WBITS - 1)
    return (code - zp).to(tl.float32)


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,          # pointers
                   M, N, K, stride_xm, stride_wn, n_blocks, zero_bytes,  # sizes and strides
                   WBITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                   IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped ordering of output tiles: GROUP_M row-tiles share each weight column-tile in cache
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # main loop over K, fp32 accumulation
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + kk[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        if WBITS == 0:
            w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + kk[:, None],
                        mask=kmask[:, None] & nmask[None, :], other=0.0).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        else:
            q = _dequant_tile(w_ptr, z_ptr, offs_n, kk, nmask, kmask, stride_wn, zero_bytes,
                              WBITS, GROUP, HAS_ZERO)
            # the whole K tile lies in one quantization block: one scale per column
            col_scale = tl.load(s_ptr + offs_n * n_blocks + k0 // GROUP, mask=nmask, other=0.0)
            if IEEE:
                part = tl.dot(x, tl.trans(q.to(x.dtype)), input_precision="ieee")
            else:
                part = tl.dot(x, tl.trans(q.to(x.dtype)))
            acc += part * col_scale[None, :]
    # epilogue: bias, cast, store
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,            # pointers
                 M, N, K, stride_xm, stride_wn, n_blocks, zero_bytes,   # sizes and strides
                 WBITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_k = tl.program_id(2)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # stream this strip of the weight once
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < k_end
        x = tl.load(x_ptr + row * stride_xm + kk, mask=kmask, other=0.0).to(tl.float32)
        if WBITS == 0:
            w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + kk[None, :],
                        mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        else:
            q = _dequant_tile(w_ptr, z_ptr, offs_n, kk, nmask, kmask, stride_wn, zero_bytes,
                              WBITS, GROUP, HAS_ZERO)
            w = q * tl.load(s_ptr + offs_n[:, None] * n_blocks + kk[None, :] // GROUP,
                            mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.where(pid_k == 0, tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32), 0.0)
    if SPLIT_K == 1:
        tl.store(y_ptr + row * N + offs_n, acc.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.atomic_add(y_ptr + row * N + offs_n, acc, mask=nmask)


# ---- config spaces -------------------------------------------------------------------------

def configs_cuda(M: int, N: int, K: int, group: int = 0) -> list[Config]:
    if M <= GEMV_MAX_M:
        return _gemv_space(N, K, group, warps=(2, 4, 8))
    out = []
    for bm, bn, bk in ((64, 64, 32), (64, 128, 32), (128, 64, 32), (128, 128, 32), (128, 128, 64),
                       (128, 256, 64), (64, 256, 32), (256, 128, 64), (32, 64, 64), (16, 64, 128)):
        for w, s in ((4, 3), (4, 4), (8, 3), (8, 4)):
            out.append(Config.of(num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8))
    return prune(out, M, N, K, group, smem_bytes=227 * 1024)


def configs_rocm(M: int, N: int, K: int, group: int = 0, matrix_cores: bool = True) -> list[Config]:
    if M <= GEMV_MAX_M:
        return _gemv_space(N, K, group, warps=(1, 2, 4))
    tiles = ((64, 64, 32), (64, 128, 32), (128, 64, 32), (128, 128, 32), (32, 64, 64), (16, 64, 64))
    if not matrix_cores:           # gfx906: no MFMA, FMA-bound, smaller tiles keep registers in check
        tiles = ((32, 32, 32), (32, 64, 32), (64, 32, 32), (64, 64, 32), (16, 64, 64))
    out = [Config.of(num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
           for bm, bn, bk in tiles for w, s in ((4, 1), (4, 2), (8, 2))]
    return prune(out, M, N, K, group, smem_bytes=64 * 1024)


def _gemv_space(N: int, K: int, group: int, warps) -> list[Config]:
    out = []
    for bn in (16, 32, 64, 128):
        for bk in (64, 128, 256, 512):
            for sk in (1, 2, 4, 8):
                for w in warps:
                    out.append(Config.of(num_warps=w, num_stages=1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk))
    return prune(out, 1, N, K, group, smem_bytes=1 << 30)


def prune(configs: list[Config], M: int, N: int, K: int, group: int, smem_bytes: int) -> list[Config]:
    """Drop configs that cannot run or cannot help: shared memory over the limit, a K tile
    straddling a quantization block, tiles far larger than the problem, useless split-K."""
    keep = []
    for c in configs:
        meta = dict(c.meta)
        bk = meta["BLOCK_K"]
        if "BLOCK_M" in meta:     # GEMM
            bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
            if group and group % bk:
                continue
            if (bm * bk + bk * bn) * 2 * c.num_stages > smem_bytes:
                continue
            if bm > max(16, triton.next_power_of_2(M)) * 2 or bn > max(16, triton.next_power_of_2(N)):
                continue
        else:                     # GEMV
            bn, sk = meta["BLOCK_N"], meta["SPLIT_K"]
            if bn > max(16, triton.next_power_of_2(N)) or bk > max(64, triton.next_power_of_2(K)):
                continue
            if sk > 1 and K // sk < bk:
                continue
            if bn * bk // (32 * c.num_warps) > 256:    # too many elements per thread: register spills
                continue
        keep.append(c)
    return keep


def default_config(M: int, N: int, K: int, group: int = 0, vendor: str = "cuda") -> Config:
    if M <= GEMV_MAX_M:
        return Config.of(num_warps=4, num_stages=1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1)
    bk = 32 if not group else min(32, group)
    if M <= 32:
        return Config.of(num_warps=4, num_stages=2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, GROUP_M=8)
    if vendor == "cuda":
        return Config.of(num_warps=8, num_stages=3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8)
    return Config.of(num_warps=4, num_stages=2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, GROUP_M=8)


# ---- launcher -------------------------------------------------------------------------------

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
           K: int | None = None, bits: int = 0, block_size: int = 0, config: Config | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N). Dense: weight (N, K). Quantized (bits 4/8): weight is the packed
    qweight (N, n_blocks, block*bits/8) with scales (N, n_blocks) and optional zeros."""
    if bits:
        check(bits in (4, 8), f"linear: bits must be 4 or 8, got {bits}")
        check(weight.dtype == torch.uint8 and weight.dim() == 3,
              f"linear: packed weight must be uint8 (N, blocks, bytes), got {weight.dtype} {tuple(weight.shape)}")
        N, n_blocks = scales.shape
        check(weight.shape[0] == N and weight.shape[1] == n_blocks and weight.shape[2] * 8 == block_size * bits,
              f"linear: packed weight {tuple(weight.shape)} does not match scales {tuple(scales.shape)}, "
              f"block {block_size}, {bits} bits")
        check(K is not None and x.shape[-1] == K and K <= n_blocks * block_size,
              f"linear: x has {x.shape[-1]} input features, the packed weight holds K={K}")
        stride_wn = n_blocks * block_size * bits // 8
    else:
        check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
              f"linear: x (..., {x.shape[-1]}) does not match weight {tuple(weight.shape)}")
        N, K = weight.shape
        n_blocks, stride_wn = 1, weight.stride(0)
        check(weight.stride(1) == 1, "linear: weight rows must be contiguous")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    vendor = "cuda" if torch.version.hip is None else "rocm"
    config = config or default_config(M, N, K, block_size if bits else 0, vendor)
    meta = dict(config.meta)
    split_k = meta.get("SPLIT_K", 1)
    y = torch.zeros((M, N), dtype=torch.float32, device=x.device) if split_k > 1 else \
        torch.empty((M, N), dtype=x.dtype, device=x.device)
    zero_bytes = zeros.shape[1] if zeros is not None else 0
    args = [x2, weight, scales if scales is not None else weight, zeros if zeros is not None else weight,
            bias if bias is not None else weight, y, M, N, K, x2.stride(0), stride_wn, n_blocks, zero_bytes]
    names = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "M", "N", "K", "stride_xm", "stride_wn",
             "n_blocks", "zero_bytes"]
    common = {"WBITS": bits, "GROUP": block_size if bits else 1, "HAS_ZERO": zeros is not None,
              "HAS_BIAS": bias is not None}
    if "BLOCK_M" in meta:
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        launch(Launch(_matmul_kernel, grid, args, dict(common, IEEE=x.dtype == torch.float32, **meta),
                        config, names))
    else:
        grid = (M, triton.cdiv(N, meta["BLOCK_N"]), split_k)
        launch(Launch(_gemv_kernel, grid, args, dict(common, **meta), config, names))
    if split_k > 1:
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], N)
