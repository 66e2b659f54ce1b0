"""2 MB pages under the memory a decode step streams.

A decode step reads every weight once, so its speed is the rate memory streams at, and on
this project's x86 machines that rate is higher from 2 MB pages than from 4 KB ones: a
2-thread reduction over 512 MB read 63.4 against 50.3 GB/s at best and 36.1 against 34.0
at the median (one process, alternating, 2026-12-07). With transparent huge pages in
"madvise" mode (the common default), memory gets 2 MB pages only where a program asks.
numpy asks for its large arrays; onnxruntime does not for the copies it pre-packs its
MatMul weights into.

Two ways in. `placed()` copies arrays into one mapping asked for 2 MB pages: glmc's cpu
kernels' weights (backends/cpu/runtime.py, `_kernel_weights`), which otherwise stream from
the artifact's file mapping, whose page-cache pages are 4 KB ones. `collapsed()` wraps a
block (an onnxruntime session being built): the anonymous mappings the block made, where
mostly populated, are then collapsed into 2 MB pages with MADV_COLLAPSE (Linux 6.1+). That moves pages, not data: addresses and contents stay. A
mapping that is mostly unpopulated (a thread's stack, an arena's free room) is left
alone, so no memory is populated that was not. Where the platform, the kernel or its
settings do not allow it, nothing changes (`available` says why).

The kernel copies the pages as it collapses them, ~440-600 MB/s here (a 600 MB fp32
session: ~1 s), so a worker thread does it after the block, while the model already runs;
`settle()` waits for it (tests, benchmarks that time the steady state).

Measured on small-glm's fp32 decode step on onnxruntime's MatMul (--fp32-matmul onnxruntime),
10 rounds of 32 steps alternating in one process with the same artifact loaded without it,
four runs (three with an exploratory version of this module, one against GLMC_HUGE_PAGES=0;
the scripts are not kept): 3.6-10% faster at the median.

Measured for `placed()` with bench/kernel_weights_ab.py (2026-12-07; one process, the
artifact loaded twice, decode steps alternating with the copies and with the mapping; the
mapping's step time over the copies', 12 rounds): small-glm fp32 median 1.08x (1.06-1.11x
in 7 of the 9 rounds with the host's bandwidth at ~35 GB/s, 1.12-1.25x at ~65), small-glm
int4 1.13x [0.99, 1.33], GLM-4-9B int4 1.09x [0.96, 1.28]:
bench/results/kernel-weights-ab-*.json. (An earlier run
of this kind had found nothing for int4, 0.995x; how it made its copies and at which
bandwidth level it ran were not recorded. These copies are packed into one 2 MB-aligned
mapping, and the rounds above caught both levels.) Where the page cache holds the file in
2 MB folios, the file mapping is 2 MB-mapped as well and the copies gain nothing: small-glm
fp32 read back from disk later that day, FilePmdMapped for all its weights, 1.00x
(bench/results/kernel-weights-ab-small-glm-fp32-pmd-mapped.json).
"""

from __future__ import annotations

import ctypes
import queue
import sys
import threading
from contextlib import contextmanager

from glmc import settings

HUGE = 2 << 20              # the x86-64 / arm64 (4 KB granule) PMD page
MADV_COLLAPSE = 25          # linux/mman.h
RESIDENT = 0.9              # a mapping is collapsed where at least this share of it is in memory


def available() -> str | None:
    """Why glmc does not collapse memory here, or None."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if not settings.huge_pages():
        return "GLMC_HUGE_PAGES=0"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return "transparent huge pages are off (enabled = never)"
    except OSError:
        return "no transparent huge pages in this kernel"
    return None


def _anonymous(fields: list[str]) -> tuple[int, int] | None:
    """(start, end) of a mapping's line of /proc/self/maps or smaps, split on whitespace at most
    5 times, where the mapping is anonymous (no file: no path, or the heap); else None."""
    path = fields[5].strip() if len(fields) > 5 else ""
    if path not in ("", "[heap]"):
        return None
    lo, hi = (int(x, 16) for x in fields[0].split("-"))
    return lo, hi


def anonymous_ranges() -> set[tuple[int, int]]:
    """(start, end) of each anonymous mapping of this process (/proc/self/maps: cheap to read,
    where smaps took 15-30 ms in a process with torch, TVM and onnxruntime loaded)."""
    with open("/proc/self/maps") as f:
        return {r for r in (_anonymous(line.split(None, 5)) for line in f) if r is not None}


def anonymous_mappings() -> dict[tuple[int, int], int]:
    """(start, end) -> resident bytes of each anonymous mapping of this process (/proc/self/smaps)."""
    out, current = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and not head[0].endswith(":"):         # a mapping's first line
                current = _anonymous(head)
            elif current is not None and head[0] == "Rss:":
                out[current] = int(head[1]) * 1024
    return out


def collapse(ranges) -> int:
    """MADV_COLLAPSE over the whole 2 MB pages of each (start, end); the bytes collapsed.
    A range the kernel refuses (no memory for huge pages, not eligible) stays as it was."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for lo, hi in ranges:
        a, b = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
        if b > a and libc.madvise(a, b - a, MADV_COLLAPSE) == 0:
            done += b - a
    return done


class _Worker:
    """One daemon thread that collapses the ranges it is given, in order."""

    def __init__(self):
        self.todo: queue.Queue = queue.Queue()
        self.collapsed = 0                  # bytes, over this process's life
        self._thread = None
        self._lock = threading.Lock()

    def put(self, ranges) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="glmc-huge-pages", daemon=True)
                self._thread.start()
        self.todo.put(list(ranges))

    def _run(self) -> None:
        while True:
            ranges = self.todo.get()
            try:
                # what is still mapped as it was, and still populated (a session freed since
                # may have left its room to something else)
                now = anonymous_mappings()
                self.collapsed += collapse([r for r in ranges if _mostly_resident(r, now.get(r))])
            except (OSError, ValueError):     # best effort: the pages stay as they were; the
                pass                          # thread lives on, so settle() never waits forever
            finally:
                self.todo.task_done()


_worker = _Worker()


def _mostly_resident(r: tuple[int, int], rss: int | None) -> bool:
    return rss is not None and r[1] - r[0] >= HUGE and rss >= RESIDENT * (r[1] - r[0])


@contextmanager
def collapsed():
    """Have what the block maps (anonymous, >= 2 MB, mostly resident) collapsed into 2 MB
    pages, by the worker, once the block is done."""
    if available() is not None:
        yield
        return
    before = anonymous_ranges()
    yield
    new = [r for r in anonymous_ranges() - before if r[1] - r[0] >= HUGE]
    if new:
        resident = anonymous_mappings()
        new = [r for r in new if _mostly_resident(r, resident.get(r))]
    if new:
        _worker.put(new)


def placed(arrays: list, align: int = 64, copied=None) -> list | None:
    """Copies of `arrays` (numpy), each starting on an `align`-byte boundary, packed in one
    anonymous mapping that starts on a 2 MB boundary and asks for 2 MB pages (MADV_HUGEPAGE
    at fault time; the worker collapses whatever the faults did not get). None where glmc
    does not ask for huge pages here (`available`). The copies are writable; the mapping
    lives as long as any of them. copied(array): called after each array is copied (to let
    its source go, so the peak is not source and copies at once)."""
    import mmap

    import numpy as np

    if available() is not None or not arrays:
        return None
    offsets, n = [], 0
    for a in arrays:
        n = -(-n // align) * align
        offsets.append(n)
        n += a.nbytes
    size = -(-n // HUGE) * HUGE
    region = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(region, np.uint8)
    start = -whole.ctypes.data % HUGE
    region.madvise(mmap.MADV_HUGEPAGE, start, size)
    body = whole[start:start + size]
    out = []
    for a, at in zip(arrays, offsets):
        copy = body[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
        copy[...] = a
        out.append(copy)
        if copied is not None:
            copied(a)
    lo = body.ctypes.data
    _worker.put([(lo, lo + size)])
    return out


def settle() -> int:
    """Wait until the worker has collapsed everything handed to it; the bytes it has collapsed
    in this process so far."""
    _worker.todo.join()
    return _worker.collapsed
