"""Autotuning: per-shape configs chosen by measurement, kept in a tuning database.

Database: one JSON file per location, the artifact's tuning.json and the user cache
($XDG_CACHE_HOME/glmc/tuning.json, else ~/.cache/glmc/tuning.json). Entries are keyed
by device name, arch, runtime version, Triton version, op, shape, dtype and quant
format, so a database from another device, arch or version is never reused. Writers
take an exclusive lock (fcntl) on a lock file beside it, re-read, merge and replace
the file atomically, so two processes tuning at once lose no entries and never tear
the file. A corrupt or foreign-version file is ignored with a warning and rebuilt.

Timing: warm-up runs, then `repeats` timed runs, median; a cache-flush hook runs
between repeats for memory-bound kernels. Tests pass a deterministic fake timer.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DB_VERSION = 1
DB_NAME = "tuning.json"


def warn(message: str) -> None:
    print(f"glmc: warning: {message}", file=sys.stderr)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glmc"


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


def cpu_device_key() -> DeviceKey:
    import platform

    import onnxruntime
    import triton

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return DeviceKey(f"{name} x{ncpu}", platform.machine(), f"onnxruntime {onnxruntime.__version__}",
                     triton.__version__)


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


# ---- measuring ------------------------------------------------------------------------------

def measure(fn: Callable[[], None], repeats: int = 5, warmup: int = 1, flush: Callable[[], None] | None = None,
            timer: Callable[[], float] = time.perf_counter) -> dict:
    """Median (and min/max) seconds of fn over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush()
        t0 = timer()
        fn()
        times.append(timer() - t0)
    return {"min": min(times), "median": statistics.median(times), "max": max(times)}


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


# ---- CPU target -----------------------------------------------------------------------------

def token_counts(max_m: int) -> list[int]:
    out, m = [], 16
    while m <= max_m:
        out.append(m)
        m *= 2
    return out


def choose_chunk(throughput: dict[int, float], within: float = 0.95) -> int:
    """The smallest token count whose throughput is within `within` of the best: the
    chunk that keeps the matmuls in their efficient (square-ish) region without
    needless padding."""
    best = max(throughput.values())
    return min(m for m, v in throughput.items() if v >= within * best)


def tune_cpu(artifact: Path, tuner: Tuner, max_m: int = 512) -> dict:
    """Measure onnxruntime's thread count (decode step) and the prefill chunk size
    (prefill tokens/s against the number of tokens M) for an artifact."""
    import numpy as np

    from glmc.artifact import read_manifest
    from glmc.backends.cpu.runtime import CpuExecutor, default_threads

    manifest = read_manifest(artifact, verify=False)
    cfg = manifest["model"]["config"]
    model_shape = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"])
    quant = manifest["quant"]
    ncpu = default_threads()
    executors = {}

    def executor(threads):
        if threads not in executors:
            executors[threads] = CpuExecutor(artifact, manifest, threads)
        return executors[threads]

    def decode_step(threads):
        ex = executor(threads)
        cache = ex.new_cache(1)
        ids, pos = np.array([[5]], np.int64), np.array([3], np.int64)
        return lambda: ex.decode(cache, ids, pos)

    thread_choices = sorted({t for t in (1, 2, 4, 8, 16, ncpu) if t <= ncpu})
    threads = tuner.choose("cpu_threads", model_shape, "fp32", quant,
                           {str(t): decode_step(t) for t in thread_choices})
    best_threads = int(threads["choice"])

    ex = executor(best_threads)
    limit = min(max_m, manifest["max_seq_len"])
    throughput, timings = {}, {}
    for m in token_counts(limit):
        ids = np.full((1, m), 5, np.int64)
        mask = np.ones((1, m), np.int64)
        cache = ex.new_cache(1)
        r = tuner.choose("cpu_prefill", (*model_shape, m), "fp32", quant,
                         {"onnxruntime": lambda ids=ids, mask=mask, cache=cache: ex.prefill(cache, ids, mask)})
        timings[m] = r["seconds"]
        throughput[m] = m / r["seconds"]
    tuner.save()
    chunk = choose_chunk(throughput) if throughput else None
    if "extend" not in manifest["backend"]["graphs"]:
        warn(f"{artifact}: built without --chunked-prefill: the chunk size is recorded but the runtime "
             "prefills in one call")
    return {"target": "cpu", "device": tuner.device.prefix(), "threads": best_threads,
            "thread_timings_s": threads["timings"], "prefill_tokens_per_s": throughput,
            "prefill_chunk": chunk, "measured": tuner.measured, "reused": tuner.reused}


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


def matmul_heatmap_cpu(cfg: dict, threads: int, tuner: Tuner, max_m: int = 512) -> dict[tuple[int, int], float]:
    """GFLOP/s of onnxruntime MatMul over the model's (N, K) pairs and token counts M."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    D = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    pairs = sorted({(cfg["num_attention_heads"] * D + 2 * cfg["num_key_value_heads"] * D, H), (H, H), (2 * I, H), (H, I)})
    out = {}
    for N, K in pairs:
        w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
                                  [numpy_helper.from_array(w, "w")])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                    .SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for m in [1] + token_counts(max_m):
            x = np.ones((m, K), np.float32)
            r = tuner.choose("cpu_matmul", (m, N, K), "fp32", "none", {"onnxruntime": lambda x=x: sess.run(None, {"x": x})})
            out[(m, N)] = 2 * m * N * K / r["seconds"] / 1e9
    tuner.save()
    return out


# ---- GPU targets ----------------------------------------------------------------------------

def candidate_configs(op: str, shape: tuple, vendor: str, arch: str) -> list:
    """The config space of op's kernel for this shape on this vendor/arch (already pruned)."""
    from glmc.backends.gpu.kernels import SPACES

    module = SPACES[op]
    if op.startswith("matmul"):
        M, N, K, group = shape
        if vendor == "cuda":
            return module.configs_cuda(M, N, K, group)
        return module.configs_rocm(M, N, K, group, matrix_cores=arch != "gfx906")
    space = module.configs_cuda if vendor == "cuda" else module.configs_rocm
    return space(*shape)


def gpu_device_key(arch: str) -> DeviceKey:
    import torch
    import triton

    from glmc.backends.triton._common import interpreting

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        runtime = f"hip {torch.version.hip}" if torch.version.hip else f"cuda {torch.version.cuda}"
    elif interpreting():
        name, runtime = "triton-interpreter (CPU; timings mean nothing)", "interpreter"
    else:
        from glmc.errors import GlmcError

        raise GlmcError("tuning a GPU artifact needs its GPU (torch sees none here)")
    return DeviceKey(name, arch, runtime, triton.__version__)


def tune_gpu(artifact: Path, manifest: dict, budget_s: float, db: TuningDB | None, timer=time.perf_counter,
             clock=time.monotonic, repeats: int = 5, max_candidates: int | None = None,
             prompt_tokens: tuple = (16, 128, 512)) -> dict:
    """Tune every kernel call the graphs make (prefill at several token counts, decode):
    each config of its space, plus the vendor library for matmuls; wrong outputs are
    discarded before timing. Returns {shape key: chosen config dict | "torch"} and stats."""
    import numpy as np
    import torch

    from glmc.backends.gpu.kernels import VENDOR, shape_key
    from glmc.backends.gpu.runtime import GpuExecutor
    from glmc.backends.triton.aot import device_arch

    backend = manifest["backend"]
    arch = device_arch() or backend["archs"][0]
    tuner = Tuner(db, gpu_device_key(arch), budget_s, timer=timer, clock=clock, repeats=repeats)
    calls: dict = {}

    def observe(op, shape, run, vendor):
        calls.setdefault(shape_key(op, *shape), (op, shape, run, vendor))

    ex = GpuExecutor(artifact, manifest, observer=observe)
    S = manifest["max_seq_len"]
    for T in sorted({min(t, S - 1) for t in prompt_tokens}):
        cache = ex.new_cache(1)
        ids = np.full((1, T), 5, np.int64)
        ex.prefill(cache, ids, np.ones_like(ids))
        ex.decode(cache, np.array([[5]], np.int64), np.array([T], np.int64))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    scratch = torch.empty(64 << 20, dtype=torch.int32, device="cuda") if torch.cuda.is_available() else None
    tol = 1e-3 if ex.dtype == torch.float32 else 5e-2
    chosen, flops = {}, {}
    for key, (op, shape, run, vendor) in calls.items():
        with torch.no_grad():
            want = vendor() if vendor is not None else run(None)
            cands = {}
            space = candidate_configs(op, shape, backend["vendor"], arch)
            if max_candidates:                   # an even spread of the space (tests)
                space = space[:: -(-len(space) // max_candidates)]
            for cfg in space:
                try:
                    got = run(cfg)
                except Exception:                  # a config this device cannot run (resources)
                    continue
                a, b = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
                if torch.allclose(a.float(), b.float(), atol=tol * max(1.0, b.abs().max().item()), rtol=tol):
                    cands[json.dumps(cfg.as_dict(), sort_keys=True)] = (lambda c=cfg: (run(c), sync()))
            if vendor is not None:
                cands[VENDOR] = lambda: (vendor(), sync())
            if not cands:
                continue
            memory_bound = op.startswith("matmul") and shape[0] <= 4
            flush = (lambda: scratch.zero_()) if memory_bound and scratch is not None else None
            r = tuner.choose(op, shape, backend["dtype"], manifest["quant"], cands, flush)
        chosen[key] = r["choice"] if r["choice"] == VENDOR else json.loads(r["choice"])
        if op.startswith("matmul"):
            M, N, K, _ = shape
            flops[(M, N)] = max(flops.get((M, N), 0.0), 2 * M * N * K / r["seconds"] / 1e12)
        if tuner.out_of_budget():
            break
    tuner.save()
    return {"target": manifest["target"], "device": tuner.device.prefix(), "arch": arch, "configs": chosen,
            "shapes": len(calls), "tuned": len(chosen), "measured": tuner.measured, "reused": tuner.reused,
            "matmul_tflops": {f"{m}x{n}": v for (m, n), v in flops.items()}}


def apply_gpu_tuning(artifact: Path, manifest: dict, configs: dict) -> None:
    """Store the chosen configs in the artifact and rebuild its AOT kernels for them."""
    import shutil

    from safetensors import safe_open

    from glmc.backends.gpu.lower import compile_kernels

    backend = manifest["backend"]
    graphs = {name: json.loads((artifact / f).read_text()) for name, f in backend["graphs"].items()}
    with safe_open(str(artifact / backend["weights"]), framework="pt") as f:
        shapes = {k: (tuple(f.get_slice(k).get_shape()), _st_dtype(f.get_slice(k).get_dtype())) for k in f.keys()}
    staging = artifact / ".kernels-new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        info = compile_kernels(staging, graphs, shapes, backend["weight_names"], backend["dtype"],
                               manifest["model"]["config"], manifest["max_seq_len"], backend["archs"], configs)
        old = artifact / ".kernels-old"
        os.rename(artifact / "kernels", old)
        os.rename(staging / "kernels", artifact / "kernels")
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    backend["tuned_configs"] = configs
    backend["kernels"] = info


def _st_dtype(name: str):
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
            "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "BOOL": torch.bool}[name]


def tune_artifact(artifact: Path, budget_s: float = 120.0, report_dir: Path | None = None,
                  db: TuningDB | None = None, timer=time.perf_counter) -> dict:
    """Tune an artifact on this machine; write its tuning.json (and manifest); optionally a report."""
    from glmc.artifact import read_manifest, write_manifest

    artifact = Path(artifact)
    manifest = read_manifest(artifact, verify=True)
    db = db if db is not None else TuningDB(cache_dir() / DB_NAME)
    kind = manifest["target"].split(":", 1)[0]
    tuner = None
    if kind != "cpu":
        result = tune_gpu(artifact, manifest, budget_s, db, timer=timer)
        apply_gpu_tuning(artifact, manifest, result["configs"])
    else:
        tuner = Tuner(db, cpu_device_key(), budget_s, timer=timer)
        result = tune_cpu(artifact, tuner)
    (artifact / DB_NAME).write_text(json.dumps({"version": DB_VERSION, **result}, indent=1) + "\n")
    write_manifest(artifact, manifest)          # recomputes every file's sha256
    if report_dir is None or (kind != "cpu" and not result["matmul_tflops"]):
        return result
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    if kind != "cpu":
        values = {tuple(int(x) for x in k.split("x")): v for k, v in result["matmul_tflops"].items()}
        heatmap(report_dir / "matmul_heatmap.png", values, "TFLOP/s", f"tuned matmul TFLOP/s, {result['device']}")
        report = result
    else:
        values = matmul_heatmap_cpu(manifest["model"]["config"], result["threads"], tuner,
                                    max_m=min(512, manifest["max_seq_len"]))
        heatmap(report_dir / "matmul_heatmap.png", values, "GFLOP/s",
                f"onnxruntime MatMul GFLOP/s, {result['threads']} threads; prefill chunk {result['prefill_chunk']}")
        report = dict(result, matmul_gflops={f"{m}x{n}": v for (m, n), v in values.items()})
    (report_dir / "tune_report.json").write_text(json.dumps(report, indent=1) + "\n")
    result["report"] = str(report_dir)
    return result
