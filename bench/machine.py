"""Machine ceilings for roofline fractions: read bandwidth and fp32 matmul peak."""

from __future__ import annotations

import time

import torch


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth_gbs(mb: int = 1024, repeats: int = 5) -> float:
    """GB/s of a streaming reduction over a buffer far larger than the caches."""
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    return x.numel() * 4 / _best(lambda: x.sum(), repeats) / 1e9


def matmul_tflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best(lambda: a @ b, repeats) / 1e12


if __name__ == "__main__":
    print(f"threads {torch.get_num_threads()}: read {read_bandwidth_gbs():.1f} GB/s, "
          f"fp32 matmul {matmul_tflops() * 1e3:.0f} GFLOP/s")
