"""Writing entry points' new K/V into a backend's KV cache. Each backend's KVCache has
`k`, `v` (one (B, Hkv, S, D) buffer per layer) and `mask` (B, S) with the same layout,
numpy on cpu and torch on GPUs; these work on both."""

from __future__ import annotations


def store_kv(cache, kv, start: int, mask) -> None:
    """Prefill / extend: new K/V (k_0, v_0, k_1, ...; each (B, Hkv, T, D)) into slots
    [start, start + T), marked with `mask` (B, T)."""
    T = mask.shape[1]
    for i in range(len(cache.k)):
        cache.k[i][:, :, start:start + T] = kv[2 * i]
        cache.v[i][:, :, start:start + T] = kv[2 * i + 1]
    cache.mask[:, start:start + T] = mask


def store_decode_kv(cache, kv, rows, position) -> None:
    """Decode: each row's one new token (k_0, v_0, ...; each (B, Hkv, 1, D)) into slot
    position[b] of row b; rows = arange(B) of the cache's array type."""
    for i in range(len(cache.k)):
        cache.k[i][rows, :, position] = kv[2 * i][:, :, 0]
        cache.v[i][rows, :, position] = kv[2 * i + 1][:, :, 0]
    # a value of the cache's own array type and device: a Python 1 would be a host-to-device
    # copy, which a CUDA graph capture refuses
    cache.mask[rows, position] = rows * 0 + 1
