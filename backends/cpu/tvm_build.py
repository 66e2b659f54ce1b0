"""Building glmc's TVM kernels for this machine's CPU, once: the built library is kept in
glmc's cache directory (settings.cache_dir() / "kernels"), keyed by everything the machine
code depends on (TVM's version, the CPU LLVM reports and its features, the thread count, and
the kernel set's shapes with the source of glmc's kernels, or the kernels' TIR), and loaded
from there by later loads of any artifact with the same kernels, without making their TIR.
Keeping it needs a C compiler to link the shared library (TVM's export_library); without
one, every load builds the kernels again (seconds, not an error). Within a process a kernel
set is made and loaded once (`built`): verification runs each layer as a session of its
own, and GLM-4-9B's 40 layers all take the same kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from glmc.settings import cache_dir, tvm_thread_pool

log = logging.getLogger(__name__)

_BUILT: dict = {}       # (kernel set, target, workers) -> its module, made once per process


def prim_func(func):
    """tvm.script's `T.prim_func`, as a decorator of a kernel defined in a factory function,
    without the call-stack walk: T.prim_func calls inspect.stack(), which reads the source
    lines of every frame on the stack to resolve names the kernel's (PEP 563, string)
    annotations use. Under glmc compile's verification that took 0.1-0.6 s a kernel, 41 of a
    67 s small-glm compile. Here those names come from the factory's locals (the caller's
    frame), the function's globals and its closure. The same TIR (tests/test_linearq.py)."""
    from tvm.script.parser._core import parse, utils

    names = {**func.__globals__, **sys._getframe(1).f_locals, **utils.get_func_nonlocals(func)}
    return parse(func, names, check_well_formed=True)


prim_func.dispatch_token = "tirx"       # what TVM's parser looks for on a kernel's decorator


def built(key, make_funcs, threads: int, target=None):
    """`build(make_funcs(), threads, target)` for a kernel set, once per process, and from the
    cache directory without making the funcs when it holds the set: `key` holds everything
    the funcs depend on besides glmc's kernel code (shapes, constants). The cache entry is
    keyed by `key`, the worker count the parallel loops are cut for, the target, its
    features, TVM's version and the source of glmc's cpu kernels (making the TIR to find the
    entry by its digest took ~0.8 s of a tiny-glm int8 `glmc run`'s 2.9 s first token)."""
    import tvm

    target = target or host_target(threads)
    at = (key, str(target), tvm_thread_pool(threads))
    lib = _BUILT.get(at)
    if lib is None:
        digest = hashlib.sha256(repr(at).encode())
        for part in (tvm.__version__, _kernel_source_digest(), *sorted(cpu_features(target))):
            digest.update(b"\0" + part.encode())
        lib = _BUILT[at] = build(make_funcs, threads, target, f"set-{digest.hexdigest()[:32]}")
    return lib


@functools.cache
def _kernel_source_digest() -> str:
    """The source of glmc's cpu kernels (this directory's modules): what a kernel set's TIR is
    made from besides its key."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def host_target(threads: int):
    """The LLVM target of this machine's CPU (e.g. znver3), for `threads` threads."""
    import tvm
    import tvm_ffi

    cpu = tvm_ffi.get_global_func("target.llvm_get_system_cpu")()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": threads})


def cpu_features(target) -> set[str]:
    import tvm_ffi

    return {str(k) for k in tvm_ffi.get_global_func("target.llvm_get_cpu_features")(target)}


def build(funcs, threads: int, target=None, name: str | None = None):
    """The TVM module of prim_funcs `funcs` (name -> func, or a function making them) for this
    CPU: from the cache when it holds them, else compiled (and kept there when a compiler can
    link it). The cache entry is `name`, or a digest of the funcs' TIR and the target."""
    import tvm

    target = target or host_target(threads)
    tvm_thread_pool(threads)
    if name is None:
        funcs = funcs() if callable(funcs) else funcs
        digest = hashlib.sha256()
        for part in (tvm.__version__, str(target), *sorted(cpu_features(target))):
            digest.update(part.encode() + b"\0")
        for fn in sorted(funcs):
            digest.update(fn.encode() + b"\0" + funcs[fn].script().encode() + b"\0")
        name = digest.hexdigest()[:32]
    path = cache_dir() / "kernels" / f"{name}.so"
    if path.is_file():
        try:
            return tvm.runtime.load_module(str(path))
        except Exception as e:      # a damaged entry: built again below
            log.info("kernel cache entry %s unreadable (%s); rebuilding", path, e)
    funcs = funcs() if callable(funcs) else funcs
    lib = tvm.compile(tvm.IRModule(funcs), target=target)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        lib.export_library(tmp)
        os.replace(tmp, path)
    except Exception as e:          # no compiler to link with, a read-only cache: not kept
        log.info("kernels not kept in %s: %s", path.parent, e)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return lib
