"""Runtime A/B of two CPU artifacts of the same model (e.g. built by two glmc versions, each
run by its own venv): prefill of a 128-token prompt and 32 decode steps after it, 5 times;
min/median/max (glmc.measure.summarize), plus RSS. Used for bench/results/cpu-one-session-ab.json:

    OLD/.venv/bin/python bench/ab_runtime.py old.glmc; .venv/bin/python bench/ab_runtime.py new.glmc
"""

import json
import sys
import time

import numpy as np

import glmc
from glmc.measure import peak_rss_mb, summarize


def main(artifact: str, prompt_len: int = 128, steps: int = 32, repeats: int = 5) -> dict:
    ex = glmc.load(artifact, verify=False).executor
    ids = np.arange(5, 5 + prompt_len, dtype=np.int64)[None]
    prefill, decode = [], []
    for _ in range(repeats):
        cache = ex.new_cache(1)
        t0 = time.perf_counter()
        last = ex.prefill(cache, ids, np.ones_like(ids))
        prefill.append(time.perf_counter() - t0)
        pos, tok = np.array([prompt_len]), np.array([[int(last[0].argmax())]])
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = ex.decode(cache, tok, pos)
            decode.append(time.perf_counter() - t0)
            tok, pos = np.array([[int(logits[0, 0].argmax())]]), pos + 1
    rss = next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
    return {f"prefill{prompt_len}_s": summarize(prefill), "decode_step_s": summarize(decode),
            "rss_mb": rss, "peak_mb": round(peak_rss_mb())}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
