"""`glmc serve` throughput and latency: 1, 4 and 16 concurrent clients against one request
at a time, in one run, through the real `openai` client.

    python bench/serve_throughput.py [ARTIFACT] [--requests 32] [--max-tokens 64]
                                     [--out bench/results/serve-small-glm-int4.json]

Without ARTIFACT, small-glm is compiled at int4 (group 128). The server runs with
--max-batch 16. Each setting sends the same `--requests` greedy completions (prompts of
~40 tokens, `--max-tokens` new tokens each); "sequential" sends them one after another.
Reported per setting: total completion tokens per second, and request latency p50/p95
(with min/max), as seen by the clients.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    import httpx
    import numpy as np
    import openai

    import glmc

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", type=Path)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    art = args.artifact or glmc.compile("small-glm", Path(tempfile.mkdtemp()) / "small-glm-int4.glmc",
                                        quant="int4", progress=False)
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "glmc.cli", "serve", str(art), "--port", str(port),
                             "--max-batch", "16", "--max-queue", "256"], stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    prompts = [f"request {i}: " + "the quick brown fox jumps over the lazy dog " * 1 for i in range(args.requests)]

    def ask(p):
        t0 = time.perf_counter()
        r = client.completions.create(model="m", prompt=p, max_tokens=args.max_tokens, temperature=0)
        return time.perf_counter() - t0, r.usage.completion_tokens

    def run(workers):
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(ask, prompts))
        wall = time.perf_counter() - t0
        lat = np.array([o[0] for o in out])
        tokens = sum(o[1] for o in out)
        return {"clients": workers, "requests": len(out), "completion_tokens": tokens, "seconds": wall,
                "tokens_per_s": tokens / wall,
                "latency_s": {"min": float(lat.min()), "p50": float(np.percentile(lat, 50)),
                              "p95": float(np.percentile(lat, 95)), "max": float(lat.max())}}

    try:
        ask(prompts[0])                                   # warm-up: sessions, first binding
        results = {"sequential": run(1)}
        for n in (1, 4, 16):
            results[f"{n}-clients"] = run(n)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    seq = results["sequential"]["tokens_per_s"]
    report = {
        "what": "glmc serve completions: total tokens/s and client latency by concurrency (greedy)",
        "artifact": str(art), "max_batch": 16, "max_tokens": args.max_tokens,
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "versions": {"glmc": glmc.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                     "openai": openai.__version__},
        "results": results,
        "throughput_over_sequential": {k: v["tokens_per_s"] / seq for k, v in results.items()},
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
