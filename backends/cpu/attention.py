"""One decode step's attention on the CPU as a TVM kernel: what onnxruntime's
GroupQueryAttention does for one new token per row (packed QKV, interleaved rotary over the
first `2 * half` dims, the new key and value written into the shared (B, Hkv, S, D) cache at
slot seqlens_k[b], attention over slots 0 .. seqlens_k[b]), computed so that each key and
value row is read once for all the query heads that share it.

Why glmc has its own: onnxruntime's CPU kernel works head by head, so each of a group's
query heads reads the group's whole cache again. On the GLM-4-9B shape (32 query heads, 2
KV heads, head_dim 128), 2 threads, one GroupQueryAttention at context 1024 took 0.92 ms
and this kernel 0.27 ms (bench/attention.py, bench/results/attention-glm4-9b-cpu.json): 40
layers' worth of the difference is ~26 ms of a ~250 ms int4 decode step. With G = 16 query
heads per cached row the step is compute-bound (~1M 8-lane FMAs per layer at 1024), not
bound by the 2.1 MB it reads. The kernel runs where glmc's linears run: in the split step
(backends/cpu/runtime16.py), for planned calls of one token per row.

Prompts (C new tokens per row) run a second kernel, `_prompt`: the keys and values into the
cache, then per (row, KV head, PROMPT_ROWS query rows) scores as a small gemm over tiles of
transposed keys, the causal mask, an online softmax and the tile's values weighted in. Only
the causal half is computed, each key and value read once per work item for all the heads
sharing it. The operator alone, each engine in its own process, glmc over onnxruntime
(bench/attention.py --prompt, bench/results/attention-prompt-cpu.json): small-glm shape
0.92x / 1.13x / 1.59x at 32 / 128 / 512 tokens, GLM-4-9B shape 1.60x / 1.93x / 1.32x; inside
glmc's step, where onnxruntime's threads do not spin, its attention, norms and SwiGLU pieces
took 16-24 ms of a 128-token small-glm int4 prompt, glmc's kernels 7-9 ms.

The decode kernel, per (row b, KV head g) one task of a parallel loop, with p = seqlens_k[b], G = H / Hkv:
  k, v  = the new key and value (+ bias), k rotated at position p -> cache slot p
  q[h]  = query head g * G + h (+ bias), rotated at p, times `scale`          (h < G)
  s[h, t] = q[h] . K[t]       for t <= p: each K[t] loaded once, used by all G heads
  w[h, t] = exp(s[h, t] - max_t s[h]) (a degree-6 polynomial after range reduction,
            |relative error| < 2e-7), the row sums kept
  out[h] = sum_t w[h, t] V[t] / sum_t w[h, t]: in tiles of TILE slots (their V rows stay in
            L1), HB heads x CB vectors of dims held in registers over a tile
"""

from __future__ import annotations

import numpy as np

from glmc.backends.cpu.linear16 import aligned_empty, available
from glmc.backends.cpu.tvm_build import built, host_target, prim_func
from glmc.errors import GlmcError
from glmc.settings import tvm_thread_pool

LANES = 8           # fp32 lanes of an AVX2 vector
TILE = 32           # cache slots per tile of the weighted sum of V


def supported(H: int, Hkv: int, D: int, half: int) -> str | None:
    """Why attention of this shape cannot run as the kernel, or None."""
    if H % Hkv:
        return f"{H} query heads are not a multiple of {Hkv} KV heads"
    if D % LANES:
        return f"head_dim {D} is not a multiple of {LANES}"
    if 2 * half > D:
        return f"rotary width {2 * half} exceeds head_dim {D}"
    return None


def scratch_slots(capacity: int) -> int:
    """Slots of the weights scratch for a cache of `capacity` slots (whole vectors)."""
    return -(-capacity // LANES) * LANES


def exp8(T, x):
    """exp of 8 fp32 lanes: n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two), exp(r)
    by Taylor to r^6 (|r| <= ln 2 / 2), times 2^n built in the exponent bits; x is clamped
    to [-87, 88] (2^n stays a normal float)."""
    def c(v):
        return T.broadcast(T.float32(v), LANES)
    x = T.min(T.max(x, c(-87.0)), c(88.0))
    n = T.floor(x * c(1.4426950408889634) + c(0.5))
    r = x - n * c(0.693359375) - n * c(-2.12194440e-4)
    p = c(1 / 720)
    for k in (1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0):
        p = p * r + c(k)
    bits = T.shift_left(T.Cast("int32x8", n) + T.broadcast(T.int32(127), LANES), T.broadcast(T.int32(23), LANES))
    return p * T.reinterpret("float32x8", bits)


def _dot(T, a: list, b: list):
    """sum_i a[i] * b[i] of vectors, as a tree (independent products, log-depth adds)."""
    terms = [x * y for x, y in zip(a, b)]
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _decode(H: int, Hkv: int, D: int, half: int, scale: float, name: str):
    from tvm.script import tirx as T

    G, W, DV = H // Hkv, (H + 2 * Hkv) * D, D // LANES
    KO, VO = H * D, (H + Hkv) * D           # where the keys and values start in a packed row
    HB = 2 if G % 2 == 0 else 1             # the weighted sum's register block: heads x vectors
    CB = next(c for c in (4, 2, 1) if DV % c == 0)
    L = LANES

    @prim_func
    def decode(qkv_handle: T.handle, bias_handle: T.handle, k_handle: T.handle, v_handle: T.handle,
               seq_handle: T.handle, cos_handle: T.handle, sin_handle: T.handle, out_handle: T.handle,
               w_handle: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        B = T.int32()
        S = T.int32()
        P = T.int32()
        SP = T.int32()
        QKV = T.match_buffer(qkv_handle, (B, W), "float32")
        BIAS = T.match_buffer(bias_handle, (W,), "float32")
        KC = T.match_buffer(k_handle, (B, Hkv, S, D), "float32")
        VC = T.match_buffer(v_handle, (B, Hkv, S, D), "float32")
        SEQ = T.match_buffer(seq_handle, (B,), "int32")
        COS = T.match_buffer(cos_handle, (P, half), "float32")
        SIN = T.match_buffer(sin_handle, (P, half), "float32")
        OUT = T.match_buffer(out_handle, (B, H * D), "float32")
        WT = T.match_buffer(w_handle, (B * Hkv, G, SP), "float32")
        for task in T.parallel(B * Hkv):
            q = T.alloc_buffer((G, D), "float32")
            o = T.alloc_buffer((G, D), "float32")
            acc = T.alloc_buffer((G * L,), "float32", scope="local")
            pv = T.alloc_buffer((HB * CB * L,), "float32", scope="local")
            mx = T.alloc_buffer((G,), "float32", scope="local")
            inv = T.alloc_buffer((G,), "float32", scope="local")
            b = task // Hkv
            g = task % Hkv
            pos = SEQ[b]
            # the new key (rotated) and value into the cache
            for i in range(half):
                x0 = QKV[b, KO + g * D + 2 * i] + BIAS[KO + g * D + 2 * i]
                x1 = QKV[b, KO + g * D + 2 * i + 1] + BIAS[KO + g * D + 2 * i + 1]
                KC[b, g, pos, 2 * i] = x0 * COS[pos, i] - x1 * SIN[pos, i]
                KC[b, g, pos, 2 * i + 1] = x1 * COS[pos, i] + x0 * SIN[pos, i]
            for d in range(2 * half, D):
                KC[b, g, pos, d] = QKV[b, KO + g * D + d] + BIAS[KO + g * D + d]
            for d in range(D):
                VC[b, g, pos, d] = QKV[b, VO + g * D + d] + BIAS[VO + g * D + d]
            # the group's queries, rotated and scaled
            for h in range(G):
                for i in range(half):
                    x0 = QKV[b, (g * G + h) * D + 2 * i] + BIAS[(g * G + h) * D + 2 * i]
                    x1 = QKV[b, (g * G + h) * D + 2 * i + 1] + BIAS[(g * G + h) * D + 2 * i + 1]
                    q[h, 2 * i] = (x0 * COS[pos, i] - x1 * SIN[pos, i]) * T.float32(scale)
                    q[h, 2 * i + 1] = (x1 * COS[pos, i] + x0 * SIN[pos, i]) * T.float32(scale)
                for d in range(2 * half, D):
                    q[h, d] = (QKV[b, (g * G + h) * D + d] + BIAS[(g * G + h) * D + d]) * T.float32(scale)
            # scores: every key row once, for all G heads
            for t in range(pos + 1):
                for h in T.unroll(G):
                    acc[T.ramp(h * L, 1, L)] = _dot(T, [q[h, T.ramp(c * L, 1, L)] for c in range(DV)],
                                                    [KC[b, g, t, T.ramp(c * L, 1, L)] for c in range(DV)])
                    WT[task, h, t] = acc[h * L] + acc[h * L + 1] + acc[h * L + 2] + acc[h * L + 3] \
                        + acc[h * L + 4] + acc[h * L + 5] + acc[h * L + 6] + acc[h * L + 7]
            # weights: exp(score - max), zero past the row's last slot; their sums
            for h in range(G):
                acc[T.ramp(0, 1, L)] = T.broadcast(T.float32(-3.0e38), L)
                for t8 in range((pos + 1) // L):
                    acc[T.ramp(0, 1, L)] = T.max(acc[T.ramp(0, 1, L)], WT[task, h, T.ramp(t8 * L, 1, L)])
                mx[h] = T.max(T.max(T.max(acc[0], acc[1]), T.max(acc[2], acc[3])),
                              T.max(T.max(acc[4], acc[5]), T.max(acc[6], acc[7])))
                for t in range((pos + 1) // L * L, pos + 1):
                    mx[h] = T.max(mx[h], WT[task, h, t])
                acc[T.ramp(0, 1, L)] = T.broadcast(T.float32(0), L)
                for t8 in range((pos + L) // L):
                    e = T.Select(T.ramp(t8 * L, 1, L) <= T.broadcast(pos, L),
                                 exp8(T, WT[task, h, T.ramp(t8 * L, 1, L)] - T.broadcast(mx[h], L)),
                                 T.broadcast(T.float32(0), L))
                    WT[task, h, T.ramp(t8 * L, 1, L)] = e
                    acc[T.ramp(0, 1, L)] = acc[T.ramp(0, 1, L)] + e
                inv[h] = T.float32(1) / (acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7])
                for c in range(DV):
                    o[h, T.ramp(c * L, 1, L)] = T.broadcast(T.float32(0), L)
            # the weighted sum of values, in tiles of TILE slots (their value rows stay in L1):
            # HB heads x CB vectors of dims held in registers over a tile
            for tile in range((pos + TILE) // TILE):
                for hb in range(G // HB):
                    for cb in range(DV // CB):
                        for i in T.unroll(HB * CB):
                            pv[T.ramp(i * L, 1, L)] = o[hb * HB + i // CB, T.ramp((cb * CB + i % CB) * L, 1, L)]
                        for t in range(T.min(TILE, pos + 1 - tile * TILE)):
                            for i in T.unroll(HB * CB):
                                pv[T.ramp(i * L, 1, L)] = pv[T.ramp(i * L, 1, L)] \
                                    + T.broadcast(WT[task, hb * HB + i // CB, tile * TILE + t], L) \
                                    * VC[b, g, tile * TILE + t, T.ramp((cb * CB + i % CB) * L, 1, L)]
                        for i in T.unroll(HB * CB):
                            o[hb * HB + i // CB, T.ramp((cb * CB + i % CB) * L, 1, L)] = pv[T.ramp(i * L, 1, L)]
            for h in range(G):
                for c in range(DV):
                    OUT[b, T.ramp((g * G + h) * D + c * L, 1, L)] = o[h, T.ramp(c * L, 1, L)] \
                        * T.broadcast(inv[h], L)

    return decode


PROMPT_ROWS = 64    # prompt kernel: query rows (tokens x the group's heads) per work item ...
PROMPT_TILE = 32    # ... and cache slots per tile of its scores


def _prompt(H: int, Hkv: int, D: int, half: int, scale: float, name: str, tasks: int):
    """Attention of C new tokens per row (a prompt, a chunk): the new keys (rotated) and
    values into the cache first, then per work item (row b, KV head g, QT consecutive tokens)
    the QT x G query rows against the cache's slots up to its last token in tiles of TK
    slots: scores as a small gemm over the tile's keys transposed (RB rows x TK slots in
    registers), the causal mask, an online softmax (running max and sum per query row, the
    output rescaled when the max moves), and the weighted sum of the tile's values."""
    from tvm.script import tirx as T

    G, W, DV = H // Hkv, (H + 2 * Hkv) * D, D // LANES
    KO, VO = H * D, (H + Hkv) * D
    QT = max(1, PROMPT_ROWS // G)           # tokens per work item
    RQ, TK = QT * G, PROMPT_TILE
    TV = TK // LANES
    RB = 2 if G % 2 == 0 else 1             # score rows held in registers at once
    CB = next(c for c in (4, 2, 1) if DV % c == 0)
    L = LANES
    NEG = -3.0e38

    @prim_func
    def prompt(qkv_handle: T.handle, bias_handle: T.handle, k_handle: T.handle, v_handle: T.handle,
               seq_handle: T.handle, cos_handle: T.handle, sin_handle: T.handle, out_handle: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        B = T.int32()
        C = T.int32()
        S = T.int32()
        P = T.int32()
        QKV = T.match_buffer(qkv_handle, (B, C, W), "float32")
        BIAS = T.match_buffer(bias_handle, (W,), "float32")
        KC = T.match_buffer(k_handle, (B, Hkv, S, D), "float32")
        VC = T.match_buffer(v_handle, (B, Hkv, S, D), "float32")
        SEQ = T.match_buffer(seq_handle, (B,), "int32")
        COS = T.match_buffer(cos_handle, (P, half), "float32")
        SIN = T.match_buffer(sin_handle, (P, half), "float32")
        OUT = T.match_buffer(out_handle, (B, C, H * D), "float32")
        # the new keys (rotated) and values into the cache: every work item below reads them
        for t in T.parallel(tasks):
            for bc in T.serial(t * (B * C) // tasks, (t + 1) * (B * C) // tasks):
                b = bc // C
                c = bc % C
                pos = SEQ[b] - C + 1 + c
                for g in range(Hkv):
                    for i in range(half):
                        x0 = QKV[b, c, KO + g * D + 2 * i] + BIAS[KO + g * D + 2 * i]
                        x1 = QKV[b, c, KO + g * D + 2 * i + 1] + BIAS[KO + g * D + 2 * i + 1]
                        KC[b, g, pos, 2 * i] = x0 * COS[pos, i] - x1 * SIN[pos, i]
                        KC[b, g, pos, 2 * i + 1] = x1 * COS[pos, i] + x0 * SIN[pos, i]
                    for d in range(2 * half, D):
                        KC[b, g, pos, d] = QKV[b, c, KO + g * D + d] + BIAS[KO + g * D + d]
                    for d in range(D):
                        VC[b, g, pos, d] = QKV[b, c, VO + g * D + d] + BIAS[VO + g * D + d]
        # work items dealt round-robin: the causal mask makes later tokens' items longer
        for t in T.parallel(tasks):
            q = T.alloc_buffer((RQ, D), "float32")
            o = T.alloc_buffer((RQ, D), "float32")
            sc = T.alloc_buffer((RQ, TK), "float32")
            kt = T.alloc_buffer((D, TK), "float32")
            mx = T.alloc_buffer((RQ,), "float32")
            total = T.alloc_buffer((RQ,), "float32")
            acc = T.alloc_buffer((RB * TK,), "float32", scope="local")
            pv = T.alloc_buffer((RB * CB * L,), "float32", scope="local")
            red = T.alloc_buffer((L,), "float32", scope="local")
            for i in T.serial((B * Hkv * ((C + QT - 1) // QT) + tasks - 1 - t) // tasks):
                w = t + i * tasks
                b = w // (Hkv * ((C + QT - 1) // QT))
                g = w // ((C + QT - 1) // QT) % Hkv
                c0 = w % ((C + QT - 1) // QT) * QT
                nq = T.min(QT, C - c0)
                p0 = SEQ[b] - C + 1 + c0
                # the item's queries, rotated and scaled; their running max, sum and output
                for qi in range(nq):
                    for h in range(G):
                        for j in range(half):
                            x0 = QKV[b, c0 + qi, (g * G + h) * D + 2 * j] + BIAS[(g * G + h) * D + 2 * j]
                            x1 = QKV[b, c0 + qi, (g * G + h) * D + 2 * j + 1] + BIAS[(g * G + h) * D + 2 * j + 1]
                            q[qi * G + h, 2 * j] = (x0 * COS[p0 + qi, j] - x1 * SIN[p0 + qi, j]) * T.float32(scale)
                            q[qi * G + h, 2 * j + 1] = (x1 * COS[p0 + qi, j] + x0 * SIN[p0 + qi, j]) * T.float32(scale)
                        for d in range(2 * half, D):
                            q[qi * G + h, d] = (QKV[b, c0 + qi, (g * G + h) * D + d] + BIAS[(g * G + h) * D + d]) \
                                * T.float32(scale)
                        mx[qi * G + h] = T.float32(NEG)
                        total[qi * G + h] = T.float32(0)
                        for cv in range(DV):
                            o[qi * G + h, T.ramp(cv * L, 1, L)] = T.broadcast(T.float32(0), L)
                for tile in range((p0 + nq - 1) // TK + 1):
                    t0 = tile * TK
                    nk = T.min(TK, p0 + nq - t0)
                    for j in range(TK):             # the tile's keys, transposed (zeros past the last)
                        if j < nk:
                            for d in range(D):
                                kt[d, j] = KC[b, g, t0 + j, d]
                        else:
                            for d in range(D):
                                kt[d, j] = T.float32(0)
                    for rb in range(nq * G // RB):   # scores: RB rows x TK slots in registers
                        for x in T.unroll(RB * TV):
                            acc[T.ramp(x * L, 1, L)] = T.broadcast(T.float32(0), L)
                        for d in range(D):
                            for x in T.unroll(RB * TV):
                                acc[T.ramp(x * L, 1, L)] = acc[T.ramp(x * L, 1, L)] \
                                    + T.broadcast(q[rb * RB + x // TV, d], L) * kt[d, T.ramp(x % TV * L, 1, L)]
                        for x in T.unroll(RB * TV):
                            sc[rb * RB + x // TV, T.ramp(x % TV * L, 1, L)] = acc[T.ramp(x * L, 1, L)]
                    for r in range(nq * G):         # causal mask, online softmax
                        red[T.ramp(0, 1, L)] = T.broadcast(T.float32(NEG), L)
                        for v in range(TV):
                            masked = T.Select(T.ramp(t0 + v * L, 1, L) <= T.broadcast(p0 + r // G, L),
                                              sc[r, T.ramp(v * L, 1, L)], T.broadcast(T.float32(NEG), L))
                            sc[r, T.ramp(v * L, 1, L)] = masked
                            red[T.ramp(0, 1, L)] = T.max(red[T.ramp(0, 1, L)], masked)
                        top = T.max(mx[r], T.max(T.max(T.max(red[0], red[1]), T.max(red[2], red[3])),
                                                 T.max(T.max(red[4], red[5]), T.max(red[6], red[7]))))
                        alpha = T.exp(mx[r] - top)
                        red[T.ramp(0, 1, L)] = T.broadcast(T.float32(0), L)
                        for v in range(TV):
                            e = T.Select(T.ramp(t0 + v * L, 1, L) <= T.broadcast(p0 + r // G, L),
                                         exp8(T, sc[r, T.ramp(v * L, 1, L)] - T.broadcast(top, L)),
                                         T.broadcast(T.float32(0), L))
                            sc[r, T.ramp(v * L, 1, L)] = e
                            red[T.ramp(0, 1, L)] = red[T.ramp(0, 1, L)] + e
                        total[r] = total[r] * alpha + (red[0] + red[1] + red[2] + red[3] + red[4] + red[5] + red[6]
                                                       + red[7])
                        mx[r] = top
                        for cv in range(DV):
                            o[r, T.ramp(cv * L, 1, L)] = o[r, T.ramp(cv * L, 1, L)] * T.broadcast(alpha, L)
                    for rb in range(nq * G // RB):   # the weighted sum of the tile's values
                        for cb in range(DV // CB):
                            for x in T.unroll(RB * CB):
                                pv[T.ramp(x * L, 1, L)] = o[rb * RB + x // CB, T.ramp((cb * CB + x % CB) * L, 1, L)]
                            for j in range(nk):
                                for x in T.unroll(RB * CB):
                                    pv[T.ramp(x * L, 1, L)] = pv[T.ramp(x * L, 1, L)] \
                                        + T.broadcast(sc[rb * RB + x // CB, j], L) \
                                        * VC[b, g, t0 + j, T.ramp((cb * CB + x % CB) * L, 1, L)]
                            for x in T.unroll(RB * CB):
                                o[rb * RB + x // CB, T.ramp((cb * CB + x % CB) * L, 1, L)] = pv[T.ramp(x * L, 1, L)]
                for r in range(nq * G):
                    for cv in range(DV):
                        OUT[b, c0 + r // G, T.ramp((g * G + r % G) * D + cv * L, 1, L)] = o[r, T.ramp(cv * L, 1, L)] \
                            * T.broadcast(T.float32(1) / total[r], L)

    return prompt


class Attention:
    """The decode kernel for one attention shape: heads H, KV heads Hkv, head_dim D, rotary
    pairs `half`, score scale `scale`, built for this CPU and `threads` threads."""

    def __init__(self, H: int, Hkv: int, D: int, half: int, scale: float, threads: int):
        why = available() or supported(H, Hkv, D, half)
        if why:
            raise GlmcError(f"glmc's attention kernel cannot run here: {why}")
        import tvm

        target = host_target(threads)       # plain 8-lane vectors, no x86 intrinsics: any CPU LLVM targets
        self.H, self.Hkv, self.D = H, Hkv, D
        shape = f"h{H}_kv{Hkv}_d{D}_r{half}_s{np.float32(scale).view(np.uint32)}"
        name, prompt = f"decode_attention_{shape}", f"prompt_attention_{shape}"
        scale = float(np.float32(scale))
        lib = built(name, lambda: {name: _decode(H, Hkv, D, half, scale, name),
                                   prompt: _prompt(H, Hkv, D, half, scale, prompt, tvm_thread_pool(threads))},
                    threads, target)
        self._fn, self._prompt = lib[name], lib[prompt]
        self._wrap = tvm.runtime.from_dlpack
        self._scratch: dict[tuple, np.ndarray] = {}

    def bound(self, qkv: np.ndarray, bias: np.ndarray | None, k_cache: np.ndarray, v_cache: np.ndarray,
              seqlens: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray):
        """The call as a function of no arguments (its views made once; the scratch shared with
        the kernel's other calls of the same shape, so calls must not run at the same time).
        qkv (B, (H + 2 Hkv) D) the packed projections of one token per row, bias its bias or
        None; k_cache / v_cache (B, Hkv, S, D), written at slot seqlens[b]; seqlens (B,)
        int32, read at each call; cos / sin (positions, half); out (B, H D). All fp32
        C-contiguous but seqlens."""
        B, S = k_cache.shape[0], k_cache.shape[2]
        if bias is None:
            bias = aligned_empty((qkv.shape[1],), np.float32)
            bias[...] = 0
        # the scores' scratch, one per shape for all the calls bound by this kernel (a step's
        # layers run one after another); one per layer would take 40x as much at GLM-4-9B's
        # 40 layers: 10 MB for a row and 2048 slots, 335 MB for 16 rows and 4096 slots
        shape = (B * self.Hkv, self.H // self.Hkv, scratch_slots(S))
        weights = self._scratch.get(shape)
        if weights is None:
            weights = self._scratch[shape] = aligned_empty(shape, np.float32)
        wrap = self._wrap
        args = tuple(wrap(a) for a in (qkv, bias, k_cache, v_cache, seqlens, cos, sin, out, weights))
        fn = self._fn

        def call(keep=(bias, weights)):
            fn(*args)
        return call


    def prompt(self, qkv: np.ndarray, bias: np.ndarray | None, k_cache: np.ndarray, v_cache: np.ndarray,
               seqlens: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray) -> None:
        """C tokens per row at once: qkv (B, C, (H + 2 Hkv) D), row b's tokens at cache slots
        seqlens[b] - C + 1 .. seqlens[b] (each attending to the slots up to its own), out (B, C,
        H D); the rest as `bound`."""
        if bias is None:
            bias = aligned_empty((qkv.shape[-1],), np.float32)
            bias[...] = 0
        wrap = self._wrap
        self._prompt(*(wrap(a) for a in (qkv, bias, k_cache, v_cache, seqlens, cos, sin, out)))


def reference(qkv, bias, k_cache, v_cache, seqlens, cos, sin, H: int, scale: float) -> np.ndarray:
    """The same step in numpy (fp64 arithmetic): updates the caches, returns out (B, H D)."""
    B, Hkv, _, D = k_cache.shape
    half = cos.shape[1]
    x = qkv.astype(np.float64) + (0 if bias is None else bias)
    out = np.zeros((B, H * D))

    def rotate(v, p):
        v = v.copy()
        c, s = cos[p].astype(np.float64), sin[p].astype(np.float64)
        x0, x1 = v[..., 0:2 * half:2].copy(), v[..., 1:2 * half:2].copy()
        v[..., 0:2 * half:2], v[..., 1:2 * half:2] = x0 * c - x1 * s, x1 * c + x0 * s
        return v

    for b in range(B):
        p = int(seqlens[b])
        q = rotate(x[b, :H * D].reshape(H, D), p) * scale
        k = rotate(x[b, H * D:(H + Hkv) * D].reshape(Hkv, D), p)
        k_cache[b, :, p], v_cache[b, :, p] = k, x[b, (H + Hkv) * D:].reshape(Hkv, D)
        for h in range(H):
            g = h // (H // Hkv)
            s = k_cache[b, g, :p + 1].astype(np.float64) @ q[h]
            w = np.exp(s - s.max())
            out[b, h * D:(h + 1) * D] = w @ v_cache[b, g, :p + 1] / w.sum()
    return out


def groupquery_model(H: int, Hkv: int, D: int, half: int, scale: float) -> bytes:
    """The onnxruntime node the kernel stands in for, as a one-node model (tests and
    bench/attention.py compare the two): GroupQueryAttention over packed QKV qkv (B, C, W),
    the cache pk / pv (B, Hkv, S, D) bound as past and present k / v, seq (B,) int32, tot
    () int32, cos / sin (positions, half) -> o (B, C, H D)."""
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "seq", "tot", "cos", "sin"],
                            ["o", "k", "v"], domain="com.microsoft", num_heads=H, kv_num_heads=Hkv, scale=scale,
                            do_rotary=1, rotary_interleaved=1)
    cache = ["B", Hkv, "S", D]
    ins = [helper.make_tensor_value_info("qkv", f, ["B", "C", (H + 2 * Hkv) * D]),
           helper.make_tensor_value_info("pk", f, cache), helper.make_tensor_value_info("pv", f, cache),
           helper.make_tensor_value_info("seq", TensorProto.INT32, ["B"]),
           helper.make_tensor_value_info("tot", TensorProto.INT32, []),
           helper.make_tensor_value_info("cos", f, ["P", half]), helper.make_tensor_value_info("sin", f, ["P", half])]
    outs = [helper.make_tensor_value_info("o", f, ["B", "C", H * D]), helper.make_tensor_value_info("k", f, cache),
            helper.make_tensor_value_info("v", f, cache)]
    graph = helper.make_graph([node], "groupquery", ins, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()
