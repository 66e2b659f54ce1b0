"""Time a cpu decode step spends outside onnxruntime's run, the issue-14 target (<= 50 us).

    python bench/step_overhead.py ARTIFACT [--steps 300] [--out bench/results/step-overhead.json]

Three numbers per step (median, with min / max), the same greedy loop each time:
  step       the whole step as `glmc.Runtime` runs it: executor.decode + the greedy pick
  run        onnxruntime's run_with_iobinding alone, timed inside that step
  python     the same step with the run replaced by a no-op: the runtime's own work
step - run is the wall time outside the run; it also holds what the run leaves behind
(caches, the pool's threads going idle), which `python` does not see.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)


def main(argv=None) -> int:
    import glmc
    from glmc.measure import summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rt = glmc.load(args.artifact)
    ex = rt.executor
    sess = ex.sessions[ex.generation]
    run, inner = sess.run_with_iobinding, []

    def timed_run(*a, **kw):
        t0 = time.perf_counter()
        out = run(*a, **kw)
        inner.append(time.perf_counter() - t0)
        return out

    def loop(n, stub_run: bool = False):
        cache, last = rt.prefill([list(range(5, 5 + args.context))])
        pos, tok, steps = np.array([args.context]), int(last[0].argmax()), []
        if stub_run:
            sess.run_with_iobinding = lambda *a, **kw: None
        for _ in range(n):
            t0 = time.perf_counter()
            tok = int(ex.decode(cache, np.array([[tok]]), pos)[0, 0].argmax())
            steps.append(time.perf_counter() - t0)
            pos[0] = args.context + (pos[0] - args.context + 1) % 64      # stay near the context
        return steps

    loop(16)
    sess.run_with_iobinding = timed_run
    inner.clear()
    steps = loop(args.steps)
    runs = inner[-args.steps:]
    python = loop(args.steps, stub_run=True)
    us = lambda xs: {k: round(v * 1e6, 1) for k, v in summarize(xs).items() if k != "n"}  # noqa: E731
    emit({"artifact": str(args.artifact), "entry": ex.generation, "context": args.context, "steps": args.steps,
          "threads": ex.threads, "step_us": us(steps), "run_us": us(runs),
          "outside_run_us": us([s - r for s, r in zip(steps, runs)]), "python_us": us(python)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
