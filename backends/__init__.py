"""glmc backends. Each exposes the same entry points, so the runtime never
branches on the target beyond choosing the module:

  lower(traced: list[Traced], out_dir, ctx) -> dict     write backend files, return manifest info
  load(artifact_dir, manifest, threads) -> Executor      with new_cache / prefill / decode
"""

from __future__ import annotations

from glmc.errors import GlmcError

TARGETS = ("cpu", "cuda", "rocm")


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
