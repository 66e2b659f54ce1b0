"""CPU prefill with the tuned chunk size against fixed naive choices, in one run.

  python bench/chunk_report.py small-glm --prompt 1024 --out bench/results/chunk-cpu.json

Compiles MODEL (max length prompt+8), runs `glmc tune` (thread count and chunk size by
measurement, through the tuning database), then times prefill of one PROMPT-token
prompt with: the tuned chunk, no chunking (one call), and chunks of 16 and 64 tokens.
Checks every variant's last-token logits against the one-call result before timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np

import glmc
from glmc.autotune import tune_artifact
from glmc.measure import measure


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        art = glmc.compile(args.model, Path(d) / "m.glmc", max_seq_len=args.prompt + 8, verify=False,
                           chunked_prefill=True)
        tuning = tune_artifact(art, budget_s=300)
        ids = [list(np.random.default_rng(0).integers(3, 1000, args.prompt))]
        variants = {f"tuned ({tuning['prefill_chunk']})": tuning["prefill_chunk"], "one call": 0,
                    "chunk 16": 16, "chunk 64": 64}
        ref = None
        rows = {}
        for name, chunk in variants.items():
            rt = glmc.load(art, prefill_chunk=chunk)
            _, last = rt.prefill(ids)
            ref = last if ref is None else ref
            err = float(np.abs(last - ref).max())
            if err > 1e-3:
                raise SystemExit(f"{name}: logits differ from the tuned run by {err}")
            t = measure(lambda rt=rt: rt.prefill(ids), repeats=args.repeats)
            rows[name] = {"chunk": chunk, "seconds": t, "tokens_per_s": args.prompt / t["median"],
                          "max_abs_logit_diff_vs_tuned": err}
    tuned = next(k for k in rows if k.startswith("tuned"))
    for name, row in rows.items():
        row["tuned_speedup"] = row["seconds"]["median"] / rows[tuned]["seconds"]["median"]
    report = {"model": args.model, "prompt_tokens": args.prompt, "machine": platform.processor() or platform.machine(),
              "threads": tuning["threads"], "tuning": {k: tuning[k] for k in ("prefill_chunk", "prefill_tokens_per_s",
                                                                               "thread_timings_s")},
              "variants": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, row in rows.items():
        s = row["seconds"]
        print(f"{name:<14} {row['tokens_per_s']:8.0f} tok/s  (min/median/max {s['min']:.3f}/{s['median']:.3f}/"
              f"{s['max']:.3f} s)  tuned is {row['tuned_speedup']:.2f}x")


if __name__ == "__main__":
    main()
