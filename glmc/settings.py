"""Every environment variable glmc reads, read here and nowhere else.

  TRITON_INTERPRET=1       run Triton kernels on CPU tensors (Triton's own switch; tests)
  GLMC_CUDA_GRAPH=0        do not capture the GPU decode step in a CUDA graph
  GLMC_MEMORY_LIMIT_GB=N   memory the up-front size check, and the cpu kernels' choice to
                           copy their weights onto 2 MB pages, assume (default: MemAvailable)
  XDG_CACHE_HOME           where the tuning database lives ($XDG_CACHE_HOME/glmc)
  GLMC_BENCH_MODEL         model of the pytest-benchmark suite in bench/ (default tiny-glm)
  GLMC_CPU_DECODE_KERNELS=onnxruntime
                           cpu split steps (glmc kernels' linears) decode attention, norms
                           and activations with onnxruntime's ops, not glmc's (A/B runs)
  GLMC_HUGE_PAGES=0        leave onnxruntime's pre-packed weights on the pages it got, and
                           let glmc's cpu kernels read the artifact's mapping (no copies on
                           2 MB pages; glmc/hugepages.py; A/B runs)
  TVM_NUM_THREADS          TVM's thread pool (16-bit cpu linears): set here to the
                           executor's threads unless the user set it

Functions, not module constants: a test or a parent process may change the
environment after import.
"""

from __future__ import annotations

import os
from pathlib import Path

from glmc.errors import GlmcError


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cuda_graph_enabled() -> bool:
    return os.environ.get("GLMC_CUDA_GRAPH", "1") != "0"


def huge_pages() -> bool:
    return os.environ.get("GLMC_HUGE_PAGES", "1") != "0"


def memory_limit_bytes() -> int | None:
    limit = os.environ.get("GLMC_MEMORY_LIMIT_GB")
    if not limit:
        return None
    try:
        return int(float(limit) * 2**30)
    except ValueError:
        raise GlmcError(f"GLMC_MEMORY_LIMIT_GB={limit!r} is not a number") from None


def tvm_thread_pool(threads: int) -> int:
    """TVM's thread pool for glmc's cpu kernels, before TVM first runs a parallel loop:
    `threads` workers. A value the user set wins. Returns the pool's worker count (the tasks
    a kernel's parallel loop is cut into)."""
    value = os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise GlmcError(f"TVM_NUM_THREADS={value!r}: expected a positive integer")
    return workers


def cpu_decode_kernels() -> bool:
    """Whether a cpu split step decodes attention, norms and activations with glmc's kernels
    (else onnxruntime's ops)."""
    value = os.environ.get("GLMC_CPU_DECODE_KERNELS", "glmc")
    if value not in ("glmc", "onnxruntime"):
        raise GlmcError(f"GLMC_CPU_DECODE_KERNELS={value!r}: expected glmc or onnxruntime")
    return value == "glmc"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glmc"


def bench_model() -> str:
    return os.environ.get("GLMC_BENCH_MODEL", "tiny-glm")


def child_env(**changes: str | None) -> dict:
    """This process's environment for a child process, with `changes` applied (None removes)."""
    env = dict(os.environ)
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env
