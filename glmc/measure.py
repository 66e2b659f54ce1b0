"""The one way glmc times things: tune, bench and the bench/ scripts all use `measure`.

Warm-up runs, then `repeats` timed runs; each timed run may be preceded by a
cache flush (memory-bound kernels) and followed by a device synchronisation.
Reported as min / median / max seconds (and the samples), never a single number.
"""

from __future__ import annotations

import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable


def summarize(samples: list[float]) -> dict:
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "n": len(samples)}


def measure(fn: Callable[..., object], repeats: int = 5, warmup: int = 1, flush: Callable[[], object] | None = None,
            sync: Callable[[], object] | None = None, timer: Callable[[], float] = time.perf_counter,
            setup: Callable[[], object] | None = None) -> dict:
    """Seconds of fn: {"min", "median", "max", "n", "samples"} over `repeats` runs after `warmup`.

    setup: run untimed before every run (warm-up included); fn then receives its result
    (e.g. a fresh prefilled cache for timing decode steps)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    def run():
        return fn(setup()) if setup is not None else fn()

    for _ in range(warmup):
        run()
    if sync is not None:
        sync()
    samples = []
    for _ in range(repeats):
        state = setup() if setup is not None else None
        if flush is not None:
            flush()
        t0 = timer()
        fn(state) if setup is not None else fn()
        if sync is not None:
            sync()
        samples.append(timer() - t0)
    return dict(summarize(samples), samples=samples)


def read_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """GB/s of a streaming reduction (torch's threads) over a buffer far larger than the caches
    (best run). The buffer is numpy's, which asks for 2 MB pages: glmc's decode streams its
    weights from such pages (glmc/hugepages.py), and on this project's machine they stream up
    to 26% faster than torch's own 4 KB-paged buffer (best runs, 63.4 against 50.3 GB/s), so
    the roofline is measured on them too."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.ones(mb * 2**20 // 4, dtype=np.float32))
    return x.numel() * 4 / measure(lambda: x.sum(), repeats)["min"] / 1e9


def matmul_tflops(n: int = 1536, repeats: int = 5) -> float:
    """fp32 TFLOP/s of an n x n matmul with torch (best run): the machine's matmul ceiling."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / measure(lambda: a @ b, repeats)["min"] / 1e12


def cpu_name() -> str:
    """The CPU model name (/proc/cpuinfo), else what platform knows."""
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        m = None
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


def peak_rss_mb() -> float:
    """This process's peak resident set (MiB): VmHWM, which starts afresh at exec. ru_maxrss
    does not: a process started from a big parent reports the parent's size as its own."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
