"""Where a cpu prompt's time goes on a split-step artifact (glmc's kernels for the linears).

    python bench/prefill_profile.py ARTIFACT [--tokens 32,128,512] [--repeats 5] [--out FILE]

Per prompt length, the prefill of one prompt timed whole and by kind of step (the split
step's `timings`: glmc's linears, its row-wise kernels, its attention kernel, onnxruntime's
pieces); what no step accounts for is the runtime's own work around them. Medians of
`--repeats` prefills after one warm-up, with min / max.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)


def main(argv=None) -> int:
    import glmc
    from glmc.measure import summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tokens", default="32,128,512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rt = glmc.load(args.artifact)
    split = rt.executor.sessions[rt.executor.generation]
    if not hasattr(split, "timings"):
        print(f"{args.artifact}: its step is one onnxruntime session (no glmc kernels): nothing to break down",
              file=sys.stderr)
        return 2
    ms = lambda xs: {k: round(v * 1e3, 2) for k, v in summarize(xs).items() if k != "n"}  # noqa: E731
    out = {"artifact": str(args.artifact), "threads": rt.executor.threads, "repeats": args.repeats, "prompts": {}}
    for n in (int(t) for t in args.tokens.split(",")):
        ids = list(range(5, 5 + n))
        totals, kinds = [], {}
        for r in range(args.repeats + 1):
            split.timings = {}
            t0 = time.perf_counter()
            rt.prefill([ids])
            total = time.perf_counter() - t0
            if r:               # the first: a warm-up
                totals.append(total)
                for kind, s in split.timings.items():
                    kinds.setdefault(kind, []).append(s)
                kinds.setdefault("the runtime's own work", []).append(total - sum(split.timings.values()))
        split.timings = None
        out["prompts"][n] = {"tokens_per_s": round(n / summarize(totals)["median"], 1), "total_ms": ms(totals),
                             "by_kind_ms": {k: ms(v) for k, v in sorted(kinds.items(), key=lambda kv: -sum(kv[1]))}}
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
