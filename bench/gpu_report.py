"""GPU benchmarks for issue 5 (run on the lent GPU; nothing here runs in CI):

  * decode GEMV, int4 group-128 weights: achieved GB/s over the device's measured copy bandwidth
  * prefill GEMM, fp16: glmc TFLOP/s against torch.matmul (cuBLAS) on the same square-ish shapes
  * end to end, small-glm and glm-1b: decode tokens/s and prefill latency, glmc vs transformers
    eager vs torch.compile, in the same run

Every kernel output is checked against torch before it is timed. Timings: CUDA events,
warm-up, 20 repeats, min/median/max; the L2 cache is flushed between GEMV repeats.

  python bench/gpu_report.py --out bench/results/gpu-$(hostname).json [--skip-e2e] [--skip-kernels] [--presets small-glm]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import triton

from glmc.backends.triton import matmul
from glmc.measure import measure
from glmc.quant import dequantize, quantize


def timed(fn, repeats=20, flush=None):
    """glmc.measure with the device synchronised around each timed run; `flush` (a buffer)
    is overwritten before each run so memory-bound kernels start from a cold L2."""
    t = measure(fn, repeats=repeats, warmup=3, sync=torch.cuda.synchronize,
                flush=(lambda: flush.zero_()) if flush is not None else None)
    t.pop("samples")
    return t


def copy_bandwidth() -> float:
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")   # 1 GiB
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / t["median"]


def bench_gemv(peak_bw: float, flush) -> list[dict]:
    rows = []
    for N, K in [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 12288)]:
        p = quantize(torch.randn(N, K), 4, 128)
        q, s = p.qweight.cuda(), p.scales.cuda()
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        ref = x.float() @ dequantize(p).cuda().t()
        got = matmul.linear(x, q, None, s, None, K, 4, 128)
        assert torch.allclose(got.float(), ref, atol=0.5, rtol=2e-2), "int4 GEMV wrong"
        best = None
        for cfg in matmul.configs_cuda(1, N, K, 128):
            t = timed(lambda: matmul.linear(x, q, None, s, None, K, 4, 128, config=cfg), repeats=5, flush=flush)
            if best is None or t["median"] < best[1]["median"]:
                best = (cfg, t)
        cfg, _ = best
        t = timed(lambda: matmul.linear(x, q, None, s, None, K, 4, 128, config=cfg), flush=flush)
        nbytes = q.numel() + s.numel() * 4 + x.numel() * 2 + N * 2
        rows.append({"N": N, "K": K, "config": cfg.as_dict(), "seconds": t, "GB_per_s": nbytes / t["median"] / 1e9,
                     "fraction_of_copy_bandwidth": nbytes / t["median"] / peak_bw})
    return rows


def bench_gemm() -> list[dict]:
    rows = []
    for M, N, K in [(2048, 4096, 4096), (4096, 4096, 4096), (2048, 12288, 12288), (512, 11008, 4096)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        w = torch.randn(N, K, device="cuda", dtype=torch.float16)
        ref = x @ w.t()
        assert torch.allclose(matmul.linear(x, w).float(), ref.float(), atol=1.0, rtol=2e-2), "GEMM wrong"
        best = None
        for cfg in matmul.configs_cuda(M, N, K):
            t = timed(lambda: matmul.linear(x, w, config=cfg), repeats=5)
            if best is None or t["median"] < best[1]["median"]:
                best = (cfg, t)
        cfg = best[0]
        ours = timed(lambda: matmul.linear(x, w, config=cfg))
        cublas = timed(lambda: x @ w.t())
        flops = 2 * M * N * K
        rows.append({"M": M, "N": N, "K": K, "config": cfg.as_dict(), "glmc_tflops": flops / ours["median"] / 1e12,
                     "torch_tflops": flops / cublas["median"] / 1e12, "ratio": cublas["median"] / ours["median"],
                     "glmc_seconds": ours, "torch_seconds": cublas})
    return rows


def bench_e2e(preset: str, out_dir) -> dict:
    import glmc
    from glmc.checkpoint import load

    art = glmc.compile(preset, f"{out_dir}/{preset}-cuda.glmc", target="cuda", max_seq_len=1024, verify=False)
    rt = glmc.load(art)
    model = load(preset).model.half().cuda()
    prompt = list(range(5, 517))                    # 512 tokens
    res = {"preset": preset}
    want = model.generate(torch.tensor([prompt[:32]], device="cuda"), max_new_tokens=16, do_sample=False,
                          min_new_tokens=16)[0, 32:].tolist()
    res["greedy_tokens_equal_eager"] = rt.generate([prompt[:32]], max_new_tokens=16, stop_at_eos=False)[0] == want
    res["glmc_prefill512_s"] = measure(lambda: rt.generate([prompt], max_new_tokens=1), repeats=3)["median"]
    n = 128
    res["glmc_decode_tok_s"] = n / measure(lambda: rt.generate([prompt[:16]], max_new_tokens=n, stop_at_eos=False),
                                           repeats=3)["median"]
    for name, m in (("eager", model), ("compile", torch.compile(model, mode="reduce-overhead"))):
        try:
            ids = torch.tensor([prompt], device="cuda")
            short = torch.tensor([prompt[:16]], device="cuda")
            with torch.no_grad():
                res[f"{name}_prefill512_s"] = measure(lambda: m(ids), repeats=3, sync=torch.cuda.synchronize)["median"]
                res[f"{name}_decode_tok_s"] = n / measure(
                    lambda: m.generate(short, max_new_tokens=n, min_new_tokens=n, do_sample=False),
                    repeats=3, sync=torch.cuda.synchronize)["median"]
        except Exception as e:          # recorded, not fatal
            res[f"{name}_error"] = f"{type(e).__name__}: {e}"
    for name in ("eager", "compile"):
        if f"{name}_decode_tok_s" in res:
            res[f"decode_speedup_vs_{name}"] = res["glmc_decode_tok_s"] / res[f"{name}_decode_tok_s"]
            res[f"prefill_speedup_vs_{name}"] = res[f"{name}_prefill512_s"] / res["glmc_prefill512_s"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--presets", default="small-glm,glm-1b", help="end-to-end presets, comma-separated")
    ap.add_argument("--work", default="/tmp")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_report: no GPU visible to torch")
    props = torch.cuda.get_device_properties(0)
    report = {"device": props.name, "driver": torch.version.cuda, "torch": torch.__version__,
              "triton": triton.__version__, "python": platform.python_version(),
              "memory_GiB": round(props.total_memory / 2**30, 1)}
    report["copy_bandwidth_GB_s"] = copy_bandwidth() / 1e9
    if not args.skip_kernels:
        flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")    # 256 MiB > L2
        report["gemv_int4"] = bench_gemv(report["copy_bandwidth_GB_s"] * 1e9, flush)
        report["gemm_fp16"] = bench_gemm()
    if not args.skip_e2e:
        report["end_to_end"] = [bench_e2e(p, args.work) for p in args.presets.split(",")]
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
