"""glmc backends: one object per target family, behind one protocol, so the compiler,
runtime, tuner, bench and inspect never branch on the target.

  cpu   backends/cpu   ONNX graphs run by onnxruntime
  gpu   backends/gpu   JSON graphs run by torch, glmc ops on Triton kernels (cuda and rocm)

Each backend registers its lowering of every glmc op in glmc.registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from glmc.target import Target


class Executor(Protocol):
    """A loaded artifact on its device. Arrays in and out are numpy; the cache is the backend's."""

    def new_cache(self, batch: int): ...

    def prefill(self, cache, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, T) right-padded ids and mask -> (B, V) logits of each row's last real token; fills slots [0, T)."""

    def extend(self, cache, input_ids: np.ndarray, attention_mask: np.ndarray, start: int) -> np.ndarray:
        """(B, C) more prompt tokens at positions start.. -> (B, C or 1, V) logits."""

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, T) -> (B, T, V) logits of every position (no cache)."""

    def decode(self, cache, input_ids: np.ndarray, position: np.ndarray) -> np.ndarray:
        """(B, 1) ids at (B,) positions -> (B, 1, V) logits; writes slot `position`."""


class Backend(Protocol):
    target: Target
    default_dtype: str
    dtypes: tuple[str, ...]            # --dtype values it compiles
    chunked_prefill_default: bool       # build the extend entry point unless told otherwise

    def why_cannot_run_here(self) -> str | None:
        """Why this machine cannot run (verify, tune, profile) the target's artifacts, or None."""

    def lower(self, graphs: list, out_dir: Path, ctx, late=None) -> dict:
        """Write the backend's files for the rewritten graphs; return the manifest's backend section.
        late(name), where given, traces and rewrites one more entry the backend finds it needs
        (glmc/compiler.py: late_entries)."""

    def load(self, artifact_dir: Path, manifest: dict, threads: int | None = None) -> Executor: ...

    def hidden_states(self, graph, ctx, input_ids: list[int]) -> list[np.ndarray]:
        """Run a rewritten prefill graph that also returns every hidden state through this
        backend's own lowering and executor; the hidden states, (T, hidden) each."""

    def tune(self, artifact: Path, manifest: dict, budget_s: float, db, timer, report: bool = False) -> dict:
        """Measure on this machine; apply what it chose to the artifact (not tuning.json,
        which the caller writes). With `report`, the result carries "heatmap": (values, unit, title)."""

    def profile_decode(self, artifact: Path, manifest: dict, context: int, steps: int) -> dict[str, float]:
        """Milliseconds per op type of one decode step at `context` cached tokens."""


def get_backend(target: str | Target) -> Backend:
    target = Target.parse(target)
    if target.family == "cpu":
        from glmc.backends.cpu import CpuBackend

        return CpuBackend(target)
    from glmc.backends.gpu import GpuBackend

    return GpuBackend(target)
