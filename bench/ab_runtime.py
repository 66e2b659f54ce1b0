"""Runtime A/B of two CPU artifacts of the same model (e.g. built by two glmc versions, each
run by its own venv): prefill of a 128-token prompt and 32 decode steps after it, 5 times;
min/median/max, plus RSS. Used for bench/results/cpu-one-session-ab.json:

    OLD/.venv/bin/python bench/ab_runtime.py old.glmc; .venv/bin/python bench/ab_runtime.py new.glmc
"""
import sys, time, json, numpy as np, glmc
from glmc.measure import peak_rss_mb
art = sys.argv[1]
rt = glmc.load(art, verify=False)
ex = rt.executor
prompt = [list(range(5, 5 + 128))]
res = {"prefill128_s": [], "decode_ms": []}
for rep in range(5):
    cache = ex.new_cache(1)
    ids = np.array(prompt, np.int64)
    t0 = time.perf_counter(); last = ex.prefill(cache, ids, np.ones_like(ids)); res["prefill128_s"].append(time.perf_counter() - t0)
    pos = np.array([128]); tok = np.array([[int(last[0].argmax())]])
    for _ in range(32):
        t0 = time.perf_counter(); lg = ex.decode(cache, tok, pos); res["decode_ms"].append((time.perf_counter() - t0) * 1e3)
        tok = np.array([[int(lg[0, 0].argmax())]]); pos += 1
rss = int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
print(json.dumps({k: [round(float(np.min(v)), 4), round(float(np.median(v)), 4), round(float(np.max(v)), 4)] for k, v in res.items()}), "rss_mb", rss, "peak_mb", round(peak_rss_mb()))
