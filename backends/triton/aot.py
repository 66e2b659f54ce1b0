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
from glmc.target import ARCHS

BINARY_EXT = {"cuda": "cubin", "hip": "hsaco"}


def kernel_modules() -> list:
    """The Triton modules the GPU lowerings use (glmc.backends.gpu.kernels registers them)."""
    from glmc.backends.gpu.kernels import kernel_modules as registered

    return registered()


def kernel_sources() -> list[str]:
    """File names (in this directory) of the kernel source an artifact ships: _common.py and
    every registered kernel module."""
    return ["_common.py"] + [m.__name__.rsplit(".", 1)[1] + ".py" for m in kernel_modules()]


def jit_kernels() -> dict:
    """Kernel name -> JITFunction (the compilable form; not available under TRITON_INTERPRET=1)."""
    return {name: fn for mod in kernel_modules() for name, fn in vars(mod).items()
            if name.endswith("_kernel") and hasattr(fn, "arg_names")}


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
    for name in kernel_sources():
        h.update((here / name).read_bytes())
    return h.hexdigest()


def copy_sources(dest: Path) -> None:
    """The kernel source an artifact was built from, kept beside its binaries (never imported from there)."""
    dest.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    for name in kernel_sources():
        (dest / name).write_bytes((here / name).read_bytes())


def compile_launches(launches: list[Launch], archs: list[str], out_dir: Path) -> list[dict]:
    """Cross-compile each distinct launch for each arch into out_dir; return the index entries.

    Under TRITON_INTERPRET=1 (tests without a GPU) the kernels in this process are interpreter
    functions, which cannot be compiled: the compilation runs in a child process without it."""
    jobs = {}
    for launch in launches:
        jobs.setdefault(launch_key(launch), {
            "key": launch_key(launch), "kernel": launch.kernel.__name__, "signature": _signature(launch),
            "constexprs": dict(launch.constexprs), "num_warps": launch.config.num_warps,
            "num_stages": launch.config.num_stages})
    jobs = list(jobs.values())
    from glmc.backends.triton._common import interpreting

    if not interpreting():
        return compile_jobs(jobs, archs, out_dir)
    import subprocess
    import sys

    from glmc.settings import child_env

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "jobs.json").write_text(json.dumps({"jobs": jobs, "archs": archs}))
    env = child_env(TRITON_INTERPRET=None)
    r = subprocess.run([sys.executable, "-m", "glmc.backends.triton.aot", str(out_dir)], env=env,
                       capture_output=True, text=True)
    (out_dir / "jobs.json").unlink()
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        raise GlmcError(f"AOT kernel compilation failed: {lines[-1] if lines else 'exit ' + str(r.returncode)}")
    result = out_dir / "entries.json"
    entries = json.loads(result.read_text())
    result.unlink()
    return entries


def compile_jobs(jobs: list[dict], archs: list[str], out_dir: Path) -> list[dict]:
    fns = jit_kernels()
    entries = []
    for arch in archs:
        target = gpu_target(arch)
        ext = BINARY_EXT[target.backend]
        (out_dir / arch).mkdir(parents=True, exist_ok=True)
        for job in jobs:
            src = ASTSource(fn=fns[job["kernel"]], signature=job["signature"], constexprs=job["constexprs"])
            options = {"num_warps": job["num_warps"], "num_stages": job["num_stages"]}
            try:
                compiled = triton.compile(src, target=target, options=options)
            except Exception as e:   # a config the arch cannot build (e.g. shared memory): say which
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise GlmcError(f"AOT compile of {job['kernel']} for {arch} failed: {type(e).__name__}: {first}") from e
            stem = f"{job['kernel']}-{job['key']}"
            (out_dir / arch / f"{stem}.{ext}").write_bytes(compiled.asm[ext])
            meta = compiled.metadata._asdict()
            meta["target"] = {"backend": target.backend, "arch": target.arch, "warp_size": target.warp_size}
            (out_dir / arch / f"{stem}.json").write_text(json.dumps(meta, default=_jsonable, sort_keys=True))
            entries.append(dict(job, arch=arch, binary=f"{arch}/{stem}.{ext}", metadata=f"{arch}/{stem}.json",
                                shared_bytes=meta.get("shared", 0), hash=compiled.hash))
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

    if index.get("triton_version") != triton.__version__:
        return {}
    fns = jit_kernels()
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
            grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))   # a compiled kernel's runner takes 3 dims
            compiled[grid](*[values[n] for n in launch.kernel.arg_names])

        runners[e["key"]] = run
    return runners


if __name__ == "__main__":      # the child process of compile_launches under TRITON_INTERPRET=1
    import sys

    _out = Path(sys.argv[1])
    _spec = json.loads((_out / "jobs.json").read_text())
    try:
        _entries = compile_jobs(_spec["jobs"], _spec["archs"], _out)
    except GlmcError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    (_out / "entries.json").write_text(json.dumps(_entries))
