"""Ahead-of-time compilation of glmc's Triton kernels for GPUs this machine may not have.

`triton.compile(ASTSource(...), target=GPUTarget(...))` needs no GPU: the
compiler driver builds cubin (NVIDIA) or hsaco (AMD) from the kernel source.
An artifact stores each binary with its metadata, indexed by the launch key
(kernel, signature, constexprs, warps, stages) and arch; at load the runtime
uses a binary when the device arch and the Triton version both match, else
JIT-compiles glmc's installed kernel source.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from glmc.backends.triton._common import Launch
from glmc.errors import GlmcError

# arch name -> (backend, arch id, warp size); gfx906 = Hygon DCU Z100 / MI50 class (wave64, no matrix cores)
ARCHS = {
    "sm_80": ("cuda", 80, 32), "sm_86": ("cuda", 86, 32), "sm_89": ("cuda", 89, 32), "sm_90": ("cuda", 90, 32),
    "gfx906": ("hip", "gfx906", 64), "gfx90a": ("hip", "gfx90a", 64), "gfx942": ("hip", "gfx942", 64),
}
DEFAULT_ARCHS = {"cuda": ["sm_80", "sm_90"], "rocm": ["gfx906", "gfx90a", "gfx942"]}
BINARY_EXT = {"cuda": "cubin", "hip": "hsaco"}
KERNEL_SOURCES = ("_common.py", "rms_norm.py", "rotary.py", "swiglu.py", "attention.py", "matmul.py")


def parse_target(target: str) -> tuple[str, list[str]]:
    """'cuda' | 'cuda:sm_80,sm_90' | 'rocm:gfx906' -> (kind, archs)."""
    kind, _, archs = target.partition(":")
    if kind not in DEFAULT_ARCHS:
        raise GlmcError(f"unknown GPU target {target!r} (use cuda[:sm_80,sm_90] or rocm[:gfx906,gfx90a,gfx942])")
    names = [a.strip() for a in archs.split(",") if a.strip()] if archs else DEFAULT_ARCHS[kind]
    backend = "cuda" if kind == "cuda" else "hip"
    for a in names:
        if a not in ARCHS or ARCHS[a][0] != backend:
            known = ", ".join(k for k, v in ARCHS.items() if v[0] == backend)
            raise GlmcError(f"target {target!r}: unknown {kind} arch {a!r} (known: {known})")
    if len(set(names)) != len(names):
        raise GlmcError(f"target {target!r} names an arch twice")
    return kind, names


def gpu_target(arch: str) -> GPUTarget:
    backend, arch_id, warp = ARCHS[arch]
    return GPUTarget(backend, arch_id, warp)


def _signature(launch: Launch) -> dict:
    """Every parameter of the kernel in order; constexprs typed 'constexpr'."""
    types = launch.signature()
    return {n: ("constexpr" if n in launch.constexprs else types[n]) for n in launch.kernel.arg_names}


def launch_key(launch: Launch) -> str:
    c = launch.config
    spec = json.dumps([launch.kernel.__name__, _signature(launch), sorted(launch.constexprs.items()),
                       c.num_warps, c.num_stages], sort_keys=True, default=str)
    return hashlib.sha256(spec.encode()).hexdigest()[:24]


def source_sha256() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in KERNEL_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def copy_sources(dest: Path) -> None:
    """The kernel source an artifact was built from, kept beside its binaries (never imported from there)."""
    dest.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    for name in KERNEL_SOURCES:
        (dest / name).write_bytes((here / name).read_bytes())


def compile_launches(launches: list[Launch], archs: list[str], out_dir: Path, progress=None) -> list[dict]:
    """Cross-compile each distinct launch for each arch into out_dir; return the index entries."""
    unique = {}
    for launch in launches:
        unique.setdefault(launch_key(launch), launch)
    entries = []
    for arch in archs:
        target = gpu_target(arch)
        ext = BINARY_EXT[target.backend]
        (out_dir / arch).mkdir(parents=True, exist_ok=True)
        for key, launch in unique.items():
            src = ASTSource(fn=launch.kernel, signature=_signature(launch), constexprs=dict(launch.constexprs))
            options = {"num_warps": launch.config.num_warps, "num_stages": launch.config.num_stages}
            try:
                compiled = triton.compile(src, target=target, options=options)
            except Exception as e:   # a config the arch cannot build (e.g. shared memory): say which
                raise GlmcError(f"AOT compile of {launch.kernel.__name__} for {arch} failed: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            stem = f"{launch.kernel.__name__}-{key}"
            binary = out_dir / arch / f"{stem}.{ext}"
            binary.write_bytes(compiled.asm[ext])
            meta = compiled.metadata._asdict()
            meta["target"] = {"backend": target.backend, "arch": target.arch, "warp_size": target.warp_size}
            (out_dir / arch / f"{stem}.json").write_text(json.dumps(meta, default=_jsonable, sort_keys=True))
            entries.append({"key": key, "arch": arch, "kernel": launch.kernel.__name__,
                            "binary": f"{arch}/{stem}.{ext}", "metadata": f"{arch}/{stem}.json",
                            "signature": _signature(launch), "constexprs": dict(launch.constexprs),
                            "num_warps": launch.config.num_warps, "num_stages": launch.config.num_stages,
                            "shared_bytes": meta.get("shared", 0), "hash": compiled.hash})
            if progress:
                progress()
    return entries


def _jsonable(v):
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    return str(v)


def device_arch() -> str | None:
    """The arch name of the current GPU ('sm_90', 'gfx90a'), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if torch.version.hip:
        return re.match(r"gfx[0-9a-f]+", props.gcnArchName).group(0)
    return f"sm_{props.major}{props.minor}"


def load_prebuilt(kernels_dir: Path, index: dict, arch: str) -> dict:
    """Launch key -> runner for every stored binary of `arch`, when built by this Triton version."""
    from triton.compiler.compiler import CompiledKernel

    from glmc.backends.triton import attention, matmul, rms_norm, rotary, swiglu

    if index.get("triton_version") != triton.__version__:
        return {}
    fns = {f.__name__: f for f in (rms_norm._rms_norm_kernel, rotary._rotary_kernel, swiglu._swiglu_kernel,
                                   attention._attention_kernel, attention._attention_combine_kernel,
                                   matmul._matmul_kernel, matmul._gemv_kernel)}
    runners = {}
    for e in index["entries"]:
        if e["arch"] != arch:
            continue
        src = ASTSource(fn=fns[e["kernel"]], signature=e["signature"], constexprs=e["constexprs"])
        group = {Path(e["metadata"]).name: str(kernels_dir / e["metadata"]),
                 Path(e["binary"]).name: str(kernels_dir / e["binary"])}
        compiled = CompiledKernel(src, group, e["hash"])

        def run(launch, compiled=compiled):
            values = dict(zip(launch.names, launch.args), **launch.constexprs)
            compiled[launch.grid](*[values[n] for n in launch.kernel.arg_names])

        runners[e["key"]] = run
    return runners
