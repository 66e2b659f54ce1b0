"""Grouped-query attention with an additive mask (glmc::attention): flash-style
tiling for prefill, split along the cache length for decode (flash-decoding).

Layout: q (B, H, T, D) is viewed as (B, Hkv, REP*T, D) (REP = H / Hkv), so the
query heads sharing a K/V head are one tile of rows and each K/V tile is read
once for all of them; K/V heads are never repeated in memory. Keys are the
cache (past, S slots) followed by the T new ones. Scores, the running max and
the softmax sums are fp32 from the first product: an fp16 q.k can exceed 65504.

Decode (T = 1) with a long cache splits the keys into NUM_SPLITS ranges; each
program writes its normalised partial output and log-sum-exp, and
_attention_combine_kernel merges them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmc.backends.triton._common import Config, Launch, launch, check, next_pow2


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, o_ptr, po_ptr, lse_ptr,   # pointers
                      Hkv, T, S, D, REP, split_len, scale,                                     # sizes
                      smb, smt, smj,                                                          # mask strides
                      HAS_PAST: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)           # b * Hkv + kv head
    pid_s = tl.program_id(2)
    b = bh // Hkv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < REP * T
    t = rows % T
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    # this program's query rows (all heads of the group) and key range
    q = tl.load(q_ptr + bh * REP * T * D + rows[:, None] * D + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    n_keys = S + T
    start = pid_s * split_len
    end = tl.minimum(start + split_len, n_keys)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < end
        kvmask = jmask[:, None] & dmask[None, :]
        # keys j < S come from the cache, the rest are this call's new keys
        new_off = bh * T * D + (j - S)[:, None] * D + d[None, :]
        if HAS_PAST:
            past_off = bh * S * D + j[:, None] * D + d[None, :]
            in_past = (j < S)[:, None]
            kt = tl.load(pk_ptr + past_off, mask=kvmask & in_past, other=0.0) + \
                tl.load(k_ptr + new_off, mask=kvmask & ~in_past, other=0.0)
            vt = tl.load(pv_ptr + past_off, mask=kvmask & in_past, other=0.0) + \
                tl.load(v_ptr + new_off, mask=kvmask & ~in_past, other=0.0)
        else:
            kt = tl.load(k_ptr + new_off, mask=kvmask, other=0.0)
            vt = tl.load(v_ptr + new_off, mask=kvmask, other=0.0)
        # fp32 scores plus the additive mask
        if IEEE:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = s * scale + tl.load(mask_ptr + b * smb + t[:, None] * smt + j[None, :] * smj,
                                mask=rmask[:, None] & jmask[None, :], other=0.0).to(tl.float32)
        s = tl.where(jmask[None, :], s, float("-inf"))
        # online softmax
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    # write the normalised output (or this split's part and its log-sum-exp)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    omask = rmask[:, None] & dmask[None, :]
    if SPLIT:
        n_splits = tl.num_programs(2)
        part = (bh * n_splits + pid_s) * REP * T
        tl.store(po_ptr + (part + rows[:, None]) * D + d[None, :], out, mask=omask)
        tl.store(lse_ptr + part + rows, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe)), mask=rmask)
    else:
        tl.store(o_ptr + bh * REP * T * D + rows[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=omask)


@triton.jit
def _attention_combine_kernel(po_ptr, lse_ptr, o_ptr,   # pointers
                              R, D, NUM_SPLITS,          # sizes (R = REP * T rows per (b, kv head))
                              BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    smask = sp < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    lse = tl.load(lse_ptr + (bh * NUM_SPLITS + sp) * R + row, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(smask & (lse > float("-inf")), tl.exp(lse - m), 0.0)
    parts = tl.load(po_ptr + ((bh * NUM_SPLITS + sp)[:, None] * R + row) * D + d[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
    tl.store(o_ptr + (bh * R + row) * D + d, out.to(o_ptr.dtype.element_ty), mask=dmask)


def configs_cuda(rows: int = 64, keys: int = 2048) -> list[Config]:
    out = []
    for bm in (16, 32, 64, 128):
        for bn in (32, 64, 128):
            for w in (4, 8):
                if bm <= max(16, next_pow2(rows)) and bn <= max(32, next_pow2(keys)):
                    out += [Config.of(num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn, SPLIT_LEN=sl)
                            for s in (1, 2, 3) for sl in _split_lens(rows, keys)]
    return out


def configs_rocm(rows: int = 64, keys: int = 2048) -> list[Config]:
    # wave64 and (gfx906) no matrix cores: smaller tiles, one or two stages
    out = []
    for bm in (16, 32, 64):
        for bn in (32, 64):
            for w in (2, 4):
                if bm <= max(16, next_pow2(rows)) and bn <= max(32, next_pow2(keys)):
                    out += [Config.of(num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn, SPLIT_LEN=sl)
                            for s in (1, 2) for sl in _split_lens(rows, keys)]
    return out


def _split_lens(rows: int, keys: int) -> list[int]:
    """Decode (few rows) over a long cache: split the keys so enough programs run."""
    if rows > 16 or keys <= 256:
        return [0]                   # 0: one split
    return [0] + [s for s in (256, 512, 1024) if s < keys]


def default_config(rows: int, keys: int, vendor: str = "cuda") -> Config:
    split = 512 if rows <= 16 and keys > 1024 else 0
    return Config.of(num_warps=4, num_stages=2 if vendor == "cuda" else 1,
                     BLOCK_M=16 if rows <= 16 else 64, BLOCK_N=64 if vendor == "cuda" else 32, SPLIT_LEN=split)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None,
              config: Config | None = None) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, T, D), past (B, Hkv, S, D) or None, mask (B|1, 1, T, S+T) -> (B, H, T, D)."""
    check(q.dim() == 4 and k.dim() == 4 and v.shape == k.shape,
          f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not (B, H, T, D) / (B, Hkv, T, D)")
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    check(H % Hkv == 0 and k.shape[0] == B and k.shape[2] == T and k.shape[3] == D,
          f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} do not form grouped-query attention")
    S = 0 if past_k is None else past_k.shape[2]
    if past_k is not None:
        check(past_k.shape == (B, Hkv, S, D) and past_v.shape == past_k.shape,
              f"attention: past_k {tuple(past_k.shape)} / past_v {tuple(past_v.shape)} != {(B, Hkv, S, D)}")
    check(mask.dim() == 4 and mask.shape[-1] == S + T and mask.shape[-2] == T,
          f"attention: mask shape {tuple(mask.shape)} does not end in ({T}, {S + T})")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    REP = H // Hkv
    rows = REP * T
    config = config or default_config(rows, S + T)
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    split_len = config["SPLIT_LEN"] or (S + T)
    n_splits = triton.cdiv(S + T, split_len)
    out = torch.empty_like(q)
    ieee = q.dtype == torch.float32
    smb = mask.stride(0) if mask.shape[0] > 1 else 0
    common = dict(HAS_PAST=past_k is not None, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, next_pow2(D)))
    names = ["q_ptr", "k_ptr", "v_ptr", "pk_ptr", "pv_ptr", "mask_ptr", "o_ptr", "po_ptr", "lse_ptr",
             "Hkv", "T", "S", "D", "REP", "split_len", "scale", "smb", "smt", "smj"]
    pk = past_k.contiguous() if past_k is not None else k
    pv = past_v.contiguous() if past_v is not None else v
    grid = (triton.cdiv(rows, bm), B * Hkv, n_splits)
    if n_splits == 1:
        launch(Launch(_attention_kernel, grid,
                        [q, k, v, pk, pv, mask, out, out, out, Hkv, T, S, D, REP, split_len, float(scale),
                         smb, mask.stride(2), mask.stride(3)], dict(common, SPLIT=False), config, names))
        return out
    parts = torch.empty((B * Hkv, n_splits, rows, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B * Hkv, n_splits, rows), dtype=torch.float32, device=q.device)
    launch(Launch(_attention_kernel, grid,
                    [q, k, v, pk, pv, mask, out, parts, lse, Hkv, T, S, D, REP, split_len, float(scale),
                     smb, mask.stride(2), mask.stride(3)], dict(common, SPLIT=True), config, names))
    launch(Launch(_attention_combine_kernel, (rows, B * Hkv), [parts, lse, out, rows, D, n_splits],
                    {"BLOCK_S": max(2, next_pow2(n_splits)), "BLOCK_D": next_pow2(D)}, Config.of(num_warps=2, num_stages=1),
                    ["po_ptr", "lse_ptr", "o_ptr", "R", "D", "NUM_SPLITS"]))
    return out
