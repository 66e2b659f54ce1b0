"""glmc backends. Each exposes the same entry points, so the runtime never
branches on the target beyond choosing the module:

  lower(traced: list[Traced], out_dir, ctx) -> dict     write backend files, return manifest info
  load(artifact_dir, manifest, threads) -> Executor      with new_cache / prefill / decode
"""

from __future__ import annotations

from glmc.errors import GlmcError

TARGETS = ("cpu", "cuda", "rocm")


def store_kv(cache, kv, start: int, mask) -> None:
    """Write an entry point's new K/V (k_0, v_0, k_1, ...; each (B, Hkv, T, D)) into cache slots
    [start, start + T) and mark them with `mask` (B, T). Works for numpy and torch caches alike
    (each backend's KVCache has k, v and mask with the same layout)."""
    T = mask.shape[1]
    for i in range(len(cache.k)):
        cache.k[i][:, :, start:start + T] = kv[2 * i]
        cache.v[i][:, :, start:start + T] = kv[2 * i + 1]
    cache.mask[:, start:start + T] = mask


def get_backend(target: str):
    kind = target.split(":", 1)[0]
    if kind == "cpu":
        from glmc.backends import cpu

        return cpu
    if kind in ("cuda", "rocm"):
        try:
            import triton  # noqa: F401
        except ImportError:
            raise GlmcError(f"target {target!r} needs Triton: pip install 'glmc[gpu]'") from None
        from glmc.backends.triton.aot import parse_target

        parse_target(target)
        if kind == "cuda":
            from glmc.backends import cuda

            return cuda
        from glmc.backends import rocm

        return rocm
    raise GlmcError(f"unknown target {target!r} (supported: cpu, cuda[:sm_80,sm_90], rocm[:gfx906,gfx90a,gfx942])")
