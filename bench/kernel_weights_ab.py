"""A/B: glmc's cpu kernels reading their weights from copies on 2 MB pages, against reading the artifact's file mapping.

    python bench/kernel_weights_ab.py ARTIFACT [--rounds 12] [--context 256] [--steps 16] [--out F]

ARTIFACT: a cpu artifact whose linears run on glmc's kernels (int4 / int8 / bf16 / fp16, and
fp32 with --fp32-matmul glmc). One process loads it twice: once as glmc loads it (the
kernels' weights copied onto 2 MB pages: glmc/hugepages.py `placed`) and once with that copy
left out, so the kernels read the mapped file. Both greedy-decode the same prompt and must
give the same tokens. Then each round times `steps` decode steps after a `context`-token
prompt on each (the order alternating by round) and measures the read bandwidth
(glmc.measure.read_bandwidth_gbs). This host's bandwidth moves between ~35 and ~60 GB/s
within minutes, so the rounds are reported one by one: each one's median step time of
both, their ratio, and the fraction of the round's bandwidth each reached, counting the
bytes of every weight the kernels read per step.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)


def main(argv=None) -> int:
    import glmc.backends.cpu.runtime as runtime
    from glmc.benchmark import GlmcProvider
    from glmc.hugepages import settle
    from glmc.measure import cpu_name, read_bandwidth_gbs, summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    ids = [5 + i % 1000 for i in range(args.context)]

    def loaded(copies: bool) -> GlmcProvider:
        p = GlmcProvider(args.artifact)
        with contextlib.nullcontext() if copies else mock.patch.object(runtime, "placed", lambda *a, **k: None):
            p.prefill(ids[:4])                        # makes the step entry (and its kernels' weights)
        return p

    engines = {"copies": loaded(True), "mapping": loaded(False)}
    ex = engines["copies"].rt.executor
    if not ex._placed:
        raise SystemExit(f"{args.artifact}: its kernels' weights were not copied (no glmc kernels, no huge pages "
                         f"here, or too little memory): nothing to compare")
    step_bytes = sum(a.nbytes for a in ex._placed.values())
    settle()

    def steps(p: GlmcProvider) -> tuple[list[int], list[float]]:
        state, toks, times = p.start(ids), [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            toks += p.steps(state, 1)
            times.append(time.perf_counter() - t0)
        return toks, times

    tokens = {name: steps(p)[0] for name, p in engines.items()}
    if tokens["copies"] != tokens["mapping"]:
        raise SystemExit(f"the two loads decode differently: {tokens}")
    rounds = []
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        ms = {name: statistics.median(steps(engines[name])[1]) * 1e3 for name in order}
        bw = read_bandwidth_gbs(512, 3)
        row = {"read_bandwidth_gbs": round(bw, 1), **{f"{n}_ms": round(v, 2) for n, v in ms.items()},
               "mapping_over_copies": round(ms["mapping"] / ms["copies"], 3),
               **{f"{n}_fraction_of_bandwidth": round(step_bytes / (v / 1e3) / 1e9 / bw, 3) for n, v in ms.items()}}
        rounds.append(row)
        print(row, file=sys.stderr, flush=True)
    ratios = [row["mapping_over_copies"] for row in rounds]
    emit({"artifact": str(args.artifact), "cpu": cpu_name(), "threads": ex.threads, "context": args.context,
          "steps": args.steps, "kernel_weight_bytes_per_step": step_bytes, "same_tokens": True,
          "mapping_over_copies": summarize(ratios), "rounds": rounds}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
