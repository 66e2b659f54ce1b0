"""The machine's ceiling for glmc's int8 / int4 cpu kernels (backends/cpu/linearq.py): AVX2
vpmaddubsw (32 u8 x s8 products summed in pairs) plus the vpaddw that accumulates it, on
weights already in L1, as GMAC/s, with 1 and with `threads` TVM workers.

    python bench/int8_peak.py [--threads 2] [--out bench/results/int8-peak-cpu.json]

Each worker runs 6 independent accumulators over a 4 KB buffer of weight vectors, each
multiplied with a vector of activations held in a register: no broadcasts, no unpacking,
no widening, nothing but the two instructions every product of the real kernels needs. A
batched decode or a prefill (compute-bound) cannot run its linears faster than this; a
kernel's GMAC/s over it is the fraction of the ceiling it reaches.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)

VECTORS = 120           # the weight buffer: 120 x 32 bytes, L1-resident
REPEATS = 20000         # passes over it per task and call
ACC = 6                 # independent accumulators, each with its activations: 12 of the 16 ymm registers


def _kernel(tasks: int, name: str):
    from tvm.script import tirx as T

    from glmc.backends.cpu.linearq import _madd

    @T.prim_func
    def peak(w: T.Buffer((VECTORS, 32), "uint8"), x: T.Buffer((ACC, 32), "int8"), out: T.Buffer((tasks, 16), "int16")):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        for t in T.parallel(tasks):
            acc = T.alloc_buffer((ACC * 16,), "int16", scope="local")
            for a in T.unroll(ACC):
                acc[T.ramp(a * 16, 1, 16)] = T.broadcast(T.int16(0), 16)
            for r in range(REPEATS):
                for v in range(VECTORS // ACC):
                    for a in T.unroll(ACC):
                        acc[T.ramp(a * 16, 1, 16)] = acc[T.ramp(a * 16, 1, 16)] \
                            + _madd(T, w[v * ACC + a, T.ramp(0, 1, 32)], x[a, T.ramp(0, 1, 32)])
            for a in T.unroll(1, ACC):
                acc[T.ramp(0, 1, 16)] = acc[T.ramp(0, 1, 16)] + acc[T.ramp(a * 16, 1, 16)]
            out[t, T.ramp(0, 1, 16)] = acc[T.ramp(0, 1, 16)]

    return peak


def measure_gmacs(threads: int, repeats: int = 5) -> dict[int, float]:
    """GMAC/s of vpmaddubsw + vpaddw (best of `repeats` calls) with 1 and `threads` workers."""
    import numpy as np
    import tvm

    from glmc.backends.cpu.linear16 import aligned_empty
    from glmc.backends.cpu.tvm_build import build, host_target

    counts = sorted({1, threads})
    lib = build({f"int8_peak_{n}": _kernel(n, f"int8_peak_{n}") for n in counts}, threads, host_target(threads))
    w = aligned_empty((VECTORS, 32), np.uint8)
    w[...] = np.random.default_rng(0).integers(0, 16, w.shape, dtype=np.uint8)
    x = aligned_empty((ACC, 32), np.int8)
    x[...] = np.random.default_rng(1).integers(-127, 128, x.shape, dtype=np.int8)
    out = {}
    for n in counts:
        o = aligned_empty((n, 16), np.int16)
        args = [tvm.runtime.from_dlpack(a) for a in (w, x, o)]
        fn = lib[f"int8_peak_{n}"]
        fn(*args)
        best = min(_timed(fn, args) for _ in range(repeats))
        out[n] = n * REPEATS * VECTORS * 32 / best / 1e9
    return out


def _timed(fn, args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    import tvm

    from glmc.measure import cpu_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    gmacs = measure_gmacs(args.threads)
    emit({"what": "vpmaddubsw + vpaddw on L1-resident weights: GMAC/s by TVM workers (best of 5 calls)",
          "gmacs_by_threads": {str(n): round(g, 1) for n, g in gmacs.items()},
          "machine": {"cpu": cpu_name(), "platform": platform.platform()}, "versions": {"tvm": tvm.__version__}},
         args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
