"""Tuning for GPU targets: every kernel call's shape over its config space (plus the
vendor library for matmuls), chosen by measurement, stored in the artifact, AOT
binaries rebuilt for the choices."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from glmc.autotune import DeviceKey, Tuner, TuningDB



def candidate_configs(op: str, shape: tuple, vendor: str, arch: str) -> list:
    """The config space of op's kernel for this shape on this vendor/arch (already pruned)."""
    from glmc.backends.gpu.kernels import spaces

    module = spaces()[op]
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
    each config of its space, plus the vendor library for matmuls. A config the compiler
    rejects (out of resources, compilation error) or that computes a wrong output is
    recorded in "rejected" with the reason, never timed; any other error is a glmc bug and
    propagates. Returns {shape key: chosen config dict | "torch"} and stats."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

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
    chosen, flops, rejected = {}, {}, {}
    for key, (op, shape, run, vendor) in calls.items():
        with torch.no_grad():
            want = vendor() if vendor is not None else run(None)
            cands = {}
            space = candidate_configs(op, shape, backend["vendor"], arch)
            if max_candidates:                   # an even spread of the space (tests)
                space = space[:: -(-len(space) // max_candidates)]
            for cfg in space:
                name = json.dumps(cfg.as_dict(), sort_keys=True)
                try:
                    got = run(cfg)
                except (OutOfResources, CompilationError) as e:     # a config this device cannot build
                    rejected.setdefault(key, {})[name] = f"{type(e).__name__}: {str(e).strip()[:200]}"
                    continue
                a, b = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
                if torch.allclose(a.float(), b.float(), atol=tol * max(1.0, b.abs().max().item()), rtol=tol):
                    cands[name] = (lambda c=cfg: (run(c), sync()))
                else:
                    err = (a.float() - b.float()).abs().max().item()
                    rejected.setdefault(key, {})[name] = f"wrong output (max abs error {err:.3g})"
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
            "rejected": rejected,
            "matmul_tflops": {f"{m}x{n}": v for (m, n), v in flops.items()}}


def apply_gpu_tuning(artifact: Path, manifest: dict, configs: dict) -> None:
    """Store the chosen configs in the artifact and rebuild its AOT kernels for them."""
    import shutil

    from safetensors import safe_open

    from glmc.backends.gpu.lower import compile_kernels
    from glmc.dtypes import from_safetensors

    backend = manifest["backend"]
    graphs = {name: json.loads((artifact / f).read_text()) for name, f in backend["graphs"].items()}
    with safe_open(str(artifact / backend["weights"]), framework="pt") as f:
        shapes = {k: (tuple(f.get_slice(k).get_shape()), from_safetensors(f.get_slice(k).get_dtype())) for k in f.keys()}
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


def tune(artifact: Path, manifest: dict, budget_s: float, db, timer, report: bool = False) -> dict:
    result = tune_gpu(artifact, manifest, budget_s, db, timer=timer)
    apply_gpu_tuning(artifact, manifest, result["configs"])
    if report and result["matmul_tflops"]:
        values = {tuple(int(x) for x in k.split("x")): v for k, v in result["matmul_tflops"].items()}
        result["heatmap"] = (values, "TFLOP/s", f"tuned matmul TFLOP/s, {result['device']}")
    return result
