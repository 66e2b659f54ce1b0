"""Where a `glmc serve` run's time goes, without HTTP: the server's continuous-batching Engine
fed the same requests as bench/serve_throughput.py, directly, one client at a time and then
with N clients, timing its prefill calls and decode steps.

    python bench/serve_engine.py ARTIFACT [--requests 32] [--max-tokens 64] [--clients 16]
                                 [--rounds 2] [--out bench/results/serve-engine.json]

Per setting (the rounds alternate sequential / batched, after one untimed warm-up of each):
total completion tokens per second; seconds in prefill calls and in decode steps, and ms per
decode step (and, on glmc's cpu kernels, by kind of call). From those, the bound batching has
on this workload: prefill does the same work whether requests come one at a time or together
(the prompts' tokens, compute-bound in both), so throughput over sequential can be at most
(prefill + decode alone) / prefill, and the decode steps' share says how much of the rest is
left to gain. The batched steps' linears
are compute-bound: their GMAC/s is reported beside the machine's int8 multiply-add ceiling
(bench/int8_peak.py), measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from int8_peak import measure_gmacs  # noqa: E402  (bench/, the script's own directory)
from report_json import emit  # noqa: E402


def _linear_macs(rt) -> int:
    """Multiply-adds of one token's linears in a decode step (the lm_head once)."""
    from glmc.modelcfg import head_dim

    c = rt.manifest["model"]["config"]
    H, F, D = c["hidden_size"], c["intermediate_size"], head_dim(c)
    qkv = H * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * D
    layer = qkv + c["num_attention_heads"] * D * H + 2 * H * F + F * H
    return c["num_hidden_layers"] * layer + H * c["vocab_size"]


def main(argv=None) -> int:
    import numpy as np

    import glmc
    from glmc.measure import cpu_name, summarize
    from glmc.serve import Engine, Job

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rt = glmc.load(args.artifact)
    engine = Engine(rt, max_batch=args.clients, max_queue=args.requests)
    spent, calls = collections.Counter(), collections.Counter()
    for kind in ("prefill", "decode"):          # the engine's executor calls, timed
        fn = getattr(engine.ex, kind)

        def timed(*a, fn=fn, kind=kind):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                spent[kind] += time.perf_counter() - t0
                calls[kind] += 1
        setattr(engine.ex, kind, timed)
    prompts = [rt.codec.encode(f"request {i}: the quick brown fox jumps over the lazy dog ")
               for i in range(args.requests)]
    # a split step (glmc's cpu kernels) times its planned calls by kind: the decode steps'
    split = engine.ex.sessions[engine.ex.generation]
    kinds = None
    if hasattr(split, "timings"):
        split.timings = kinds = {}

    def run(clients: int) -> dict:
        spent.clear()
        calls.clear()
        if kinds is not None:
            kinds.clear()
        slots, done, tokens = threading.Semaphore(clients), threading.Event(), []

        def deliver(event, job=None):
            if event[0] == "done":
                tokens.append(len(job.made))
                slots.release()
                if len(tokens) == len(prompts):
                    done.set()
        t0 = time.perf_counter()
        for ids in prompts:
            slots.acquire()
            job = Job(list(ids), args.max_tokens)
            job.deliver = lambda event, job=job: deliver(event, job)
            engine.submit(job)
        done.wait()
        wall = time.perf_counter() - t0
        return {"clients": clients, "seconds": wall, "tokens_per_s": sum(tokens) / wall,
                "prefill_seconds": spent["prefill"], "prefill_calls": calls["prefill"],
                "decode_seconds": spent["decode"], "decode_steps": calls["decode"],
                "ms_per_decode_step": spent["decode"] / max(1, calls["decode"]) * 1e3,
                "other_seconds": wall - spent["prefill"] - spent["decode"],
                "ms_per_decode_step_by_kind": {k: v / max(1, calls["decode"]) * 1e3 for k, v in (kinds or {}).items()}}

    for clients in (1, args.clients):           # warm-up: sessions, kernels, buffers
        run(clients)
    rounds = [(run(1), run(args.clients)) for _ in range(args.rounds)]
    engine.stop()
    from glmc.backends.cpu.linear16 import available

    # the int8 multiply-add ceiling needs TVM (glmc[cpu16]); without it, none is reported
    peak = None if available() else round(measure_gmacs(rt.executor.threads)[rt.executor.threads], 1)
    linear_macs = _linear_macs(rt)
    linears = [linear_macs * args.clients / (ms / 1e3) / 1e9 for ms in (
        sum(v for k, v in b["ms_per_decode_step_by_kind"].items() if "linears" in k) for _, b in rounds) if ms]
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in rounds]
    bounds = [(a["prefill_seconds"] + a["decode_seconds"]) / b["prefill_seconds"] for a, b in rounds]
    emit({"what": "glmc serve's Engine without HTTP: sequential vs batched, time in prefill and decode",
          "artifact": str(args.artifact), "requests": args.requests, "max_tokens": args.max_tokens,
          "prompt_tokens": int(np.median([len(p) for p in prompts])), "clients": args.clients,
          "machine": {"cpu": cpu_name(), "platform": platform.platform(), "threads": rt.executor.threads},
          "rounds": [{"sequential": a, "batched": b} for a, b in rounds],
          "batched_over_sequential": summarize(ratios),
          "bound_if_decode_were_free": summarize(bounds),
          "int8_madd_peak_gmacs": peak, "linear_macs_per_token": linear_macs,
          # the batched steps' linears (glmc's kernels, timed by kind; else none)
          "batched_linears_gmacs": summarize(linears) if linears else None}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
