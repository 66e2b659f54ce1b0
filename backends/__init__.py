"""glmc backends. Each exposes the same entry points, so the runtime never
branches on the target beyond choosing the module:

  lower(traced: list[Traced], out_dir, ctx) -> dict     write backend files, return manifest info
  load(artifact_dir, manifest, threads) -> Executor      with new_cache / prefill / decode
"""

from __future__ import annotations

from glmc.errors import GlmcError

TARGETS = ("cpu",)


def get_backend(target: str):
    kind = target.split(":", 1)[0]
    if kind == "cpu":
        from glmc.backends import cpu

        return cpu
    if kind in ("cuda", "rocm"):
        raise GlmcError(f"target {target!r}: the {kind} backend is not built yet (supported: cpu)")
    raise GlmcError(f"unknown target {target!r} (supported: cpu)")
