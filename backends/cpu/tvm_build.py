"""Building glmc's TVM kernels for this machine's CPU, once: the built library is kept in
glmc's cache directory (settings.cache_dir() / "kernels"), keyed by everything the machine
code depends on (TVM's version, the CPU LLVM reports and its features, the thread count, the
kernels' TIR), and loaded from there by later loads of any artifact with the same kernels.
Keeping it needs a C compiler to link the shared library (TVM's export_library); without
one, every load builds the kernels again (seconds, not an error). Within a process a kernel
set is made and loaded once (`built`): verification runs each layer as a session of its
own, and GLM-4-9B's 40 layers all take the same kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile

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
    """`build(make_funcs(), threads, target)`, once per process for a kernel set: `key` holds
    everything the funcs depend on besides glmc's code (shapes, constants), and the worker
    count their parallel loops were cut for is added to it here."""
    target = target or host_target(threads)
    at = (key, str(target), tvm_thread_pool(threads))
    lib = _BUILT.get(at)
    if lib is None:
        lib = _BUILT[at] = build(make_funcs(), threads, target)
    return lib


def host_target(threads: int):
    """The LLVM target of this machine's CPU (e.g. znver3), for `threads` threads."""
    import tvm
    import tvm_ffi

    cpu = tvm_ffi.get_global_func("target.llvm_get_system_cpu")()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": threads})


def cpu_features(target) -> set[str]:
    import tvm_ffi

    return {str(k) for k in tvm_ffi.get_global_func("target.llvm_get_cpu_features")(target)}


def build(funcs: dict, threads: int, target=None):
    """The TVM module of prim_funcs `funcs` (name -> func) for this CPU: from the cache when
    it holds them, else compiled (and kept there when a compiler can link it)."""
    import tvm

    target = target or host_target(threads)
    tvm_thread_pool(threads)
    digest = hashlib.sha256()
    for part in (tvm.__version__, str(target), *sorted(cpu_features(target))):
        digest.update(part.encode() + b"\0")
    for name in sorted(funcs):
        digest.update(name.encode() + b"\0" + funcs[name].script().encode() + b"\0")
    path = cache_dir() / "kernels" / f"{digest.hexdigest()[:32]}.so"
    if path.is_file():
        try:
            return tvm.runtime.load_module(str(path))
        except Exception as e:      # a damaged entry: built again below
            log.info("kernel cache entry %s unreadable (%s); rebuilding", path, e)
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
