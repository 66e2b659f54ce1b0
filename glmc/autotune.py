"""Autotuning: per-shape configs chosen by measurement, kept in a tuning database.

Database: one JSON file per location, the artifact's tuning.json and the user cache
($XDG_CACHE_HOME/glmc/tuning.json, else ~/.cache/glmc/tuning.json). Entries are keyed
by device name, arch, runtime version, Triton version, op, shape, dtype and quant
format, so a database from another device, arch or version is never reused. Writers
take an exclusive lock (fcntl) on a lock file beside it, re-read, merge and replace
the file atomically, so two processes tuning at once lose no entries and never tear
the file. A corrupt or foreign-version file is ignored with a warning and rebuilt.

Timing: glmc.measure (warm-up, `repeats` timed runs, median; a cache-flush hook
between repeats for memory-bound kernels). Tests pass a deterministic fake timer.
What to measure is the backend's (Backend.tune); this module stores and reuses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from glmc.errors import warn
from glmc.measure import measure
from glmc.settings import cache_dir

DB_VERSION = 1
DB_NAME = "tuning.json"


@dataclass(frozen=True)
class DeviceKey:
    """What makes a measurement reusable: the same device, arch and software."""

    device: str
    arch: str
    runtime: str           # onnxruntime / CUDA / HIP version
    triton: str

    def prefix(self) -> str:
        return f"{self.device}|{self.arch}|{self.runtime}|{self.triton}"


def entry_key(dev: DeviceKey, op: str, shape: tuple, dtype: str, quant: str) -> str:
    return f"{dev.prefix()}|{op}|{'x'.join(str(int(s)) for s in shape)}|{dtype}|{quant}"


class TuningDB:
    """A JSON tuning database at `path`, safe under concurrent writers."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            warn(f"{self.path}: unreadable tuning database ({type(e).__name__}); ignoring it, it will be rebuilt")
            return {}
        if not isinstance(data, dict) or data.get("version") != DB_VERSION or not isinstance(data.get("entries"), dict):
            warn(f"{self.path}: tuning database of another format version; ignoring it, it will be rebuilt")
            return {}
        return {k: v for k, v in data["entries"].items() if isinstance(k, str) and isinstance(v, dict)}

    def get(self, key: str) -> dict | None:
        return self._read().get(key)

    def entries(self) -> dict:
        return self._read()

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update(self, new: dict) -> bool:
        """Merge `new` entries in; False (with a warning) when the location is not writable."""
        try:
            with self._locked():
                entries = self._read()
                entries.update(new)
                fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"version": DB_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            return True
        except OSError as e:
            warn(f"{self.path}: cannot write the tuning database ({e.strerror or e}); tuning results not cached")
            return False


def read_tuning(artifact: Path) -> dict:
    """An artifact's tuning.json (what `glmc tune` measured), or {} when absent or unreadable."""
    try:
        data = json.loads((Path(artifact) / DB_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class Tuner:
    """Chooses, per key, the fastest candidate within a time budget; reuses the database."""

    db: TuningDB | None
    device: DeviceKey
    budget_s: float = 120.0
    timer: Callable[[], float] = time.perf_counter
    clock: Callable[[], float] = time.monotonic
    repeats: int = 5
    measured: int = 0
    reused: int = 0
    results: dict = field(default_factory=dict)

    def __post_init__(self):
        self._deadline = self.clock() + self.budget_s
        self._pending: dict = {}

    def out_of_budget(self) -> bool:
        return self.clock() > self._deadline

    def choose(self, op: str, shape: tuple, dtype: str, quant: str, candidates: dict[str, Callable[[], None]],
               flush: Callable[[], None] | None = None) -> dict:
        """candidates: name -> run(). Returns {"choice", "seconds", "timings"}; from the database when known."""
        key = entry_key(self.device, op, shape, dtype, quant)
        known = self.db.get(key) if self.db is not None else None
        if known is not None and known.get("choice") in candidates:
            self.reused += 1
            self.results[key] = known
            return known
        timings = {}
        for name, run in candidates.items():
            if timings and self.out_of_budget():
                break                      # at least one candidate is always measured
            timings[name] = measure(run, repeats=self.repeats, flush=flush, timer=self.timer)["median"]
        choice = min(timings, key=timings.get)
        result = {"choice": choice, "seconds": timings[choice], "timings": timings,
                  "complete": len(timings) == len(candidates)}
        self.measured += 1
        self.results[key] = result
        self._pending[key] = result
        return result

    def save(self) -> None:
        if self.db is not None and self._pending:
            self.db.update(self._pending)
            self._pending = {}


def heatmap(path: Path, values: dict[tuple[int, int], float], unit: str, title: str) -> None:
    """PNG heat-map of achieved throughput over (M, N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ms = sorted({m for m, _ in values})
    ns = sorted({n for _, n in values})
    grid = np.array([[values.get((m, n), np.nan) for m in ms] for n in ns])
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(ms), 1.2 + 0.5 * len(ns)))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(ms)), [str(m) for m in ms])
    ax.set_yticks(range(len(ns)), [str(n) for n in ns])
    ax.set_xlabel("tokens M")
    ax.set_ylabel("output features N")
    ax.set_title(title, fontsize=9)
    for i in range(len(ns)):
        for j in range(len(ms)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, label=unit)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune_artifact(artifact: Path, budget_s: float = 120.0, report_dir: Path | None = None,
                  db: TuningDB | None = None, timer=time.perf_counter) -> dict:
    """Tune an artifact on this machine with its backend; write its tuning.json (and manifest);
    optionally a report (JSON + throughput heat-map)."""
    from glmc.artifact import read_manifest, write_manifest
    from glmc.backends import get_backend
    from glmc.errors import GlmcError

    artifact = Path(artifact)
    manifest = read_manifest(artifact, verify=True)
    backend = get_backend(manifest["target"])
    why = backend.why_cannot_run_here()
    if why:
        raise GlmcError(f"cannot tune {artifact} here: {why}")
    db = db if db is not None else TuningDB(cache_dir() / DB_NAME)
    result = backend.tune(artifact, manifest, budget_s, db, timer, report=report_dir is not None)
    chart = result.pop("heatmap", None)
    (artifact / DB_NAME).write_text(json.dumps({"version": DB_VERSION, **result}, indent=1) + "\n")
    write_manifest(artifact, manifest)          # recomputes every file's sha256
    if report_dir is None or chart is None:
        return result
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    values, unit, title = chart
    heatmap(report_dir / "matmul_heatmap.png", values, unit, title)
    (report_dir / "tune_report.json").write_text(json.dumps(result, indent=1) + "\n")
    result["report"] = str(report_dir)
    return result
