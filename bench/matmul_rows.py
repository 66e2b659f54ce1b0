"""How onnxruntime's MatMulNBits cost grows with the rows it multiplies: the bound on what
batching decode rows (glmc serve) can gain on this CPU.

    python bench/matmul_rows.py [--k 1024] [--n 5632] [--threads 2]
                                [--out bench/results/matmul-rows-cpu.json]

One MatMulNBits node per session (random packed weights), for int4 group 128 and 32 and
int8 group 128, at accuracy levels 0, 1 and 4; and, for comparison, the other forms
onnxruntime has for the same weight: fp32 MatMul, and com.microsoft.DynamicQuantizeMatMul
(int8 weights with one scale per output column, activations quantized per call to uint8
with one scale per tensor: MLAS's integer GEMM). Each timed at M = 1, 4 and 16 rows: 7 rounds
of 20 runs each after 5 warm-up runs. Reported per setting: ms per call at M=1 and M=16
(min/median/max over rounds) and the cost at M=4 and M=16 as a multiple of M=1 (medians of
the same run). A 16-row decode step can be at most 16 / (that multiple) times the
throughput of 16 one-row steps of the same form; `16_rows_vs_16_int4_steps` compares each
form's 16-row call with 16 one-row int4 g128 level-4 calls (what glmc's int4 artifacts run).
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit, matmul_args  # noqa: E402  (bench/, the script's own directory)


def nbits_session(K: int, N: int, bits: int, block: int, accuracy: int, threads: int):
    """One MatMulNBits node over random packed weights (group `block`, `bits` bits)."""
    import numpy as np
    from onnx import helper

    from glmc.backends.cpu.tune import matmul_session

    rng = np.random.default_rng(0)
    blocks = K // block
    packed = rng.integers(0, 255, (N, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(N * blocks) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=accuracy)
    return matmul_session(node, K, N, {"q": packed, "s": scales}, threads)


def _dense_session(K: int, N: int, threads: int, quantized: bool):
    """fp32 MatMul, or DynamicQuantizeMatMul over int8 weights with a scale per output column."""
    import numpy as np
    from onnx import helper

    from glmc.backends.cpu.tune import matmul_session

    rng = np.random.default_rng(0)
    if not quantized:
        w = rng.standard_normal((K, N)).astype(np.float32)
        return matmul_session(helper.make_node("MatMul", ["x", "w"], ["y"]), K, N, {"w": w}, threads)
    w = rng.integers(-127, 128, (K, N), dtype=np.int8)
    scales = (rng.random(N) * 0.01).astype(np.float32)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain="com.microsoft")
    return matmul_session(node, K, N, {"w": w, "s": scales}, threads)


def main(argv=None) -> int:
    import numpy as np
    import onnxruntime

    from glmc.measure import cpu_name, summarize

    args = matmul_args(__doc__, 1024, 5632, argv)
    rows = (1, 4, 16)
    results = {}
    forms = {f"int{bits} g{block} accuracy_level {accuracy}":
             lambda bits=bits, block=block, accuracy=accuracy: nbits_session(args.k, args.n, bits, block, accuracy,
                                                                          args.threads)
             for bits, block in ((4, 128), (4, 32), (8, 128)) for accuracy in (0, 1, 4)}
    forms["fp32 MatMul"] = lambda: _dense_session(args.k, args.n, args.threads, quantized=False)
    forms["int8 per-column DynamicQuantizeMatMul"] = lambda: _dense_session(args.k, args.n, args.threads, quantized=True)
    for name, make in forms.items():
        sess = make()
        per_round = {m: [] for m in rows}
        inputs = {m: {"x": np.random.rand(m, args.k).astype(np.float32)} for m in rows}
        for m in rows:
            for _ in range(5):
                sess.run(None, inputs[m])
        for _ in range(7):
            for m in rows:
                t0 = time.perf_counter()
                for _ in range(20):
                    sess.run(None, inputs[m])
                per_round[m].append((time.perf_counter() - t0) / 20 * 1e3)
        one = float(np.median(per_round[1]))
        results[name] = {
            "ms_at_1_row": summarize(per_round[1]),
            "ms_at_16_rows": summarize(per_round[16]),
            "cost_vs_1_row": {str(m): float(np.median(per_round[m])) / one for m in rows[1:]},
        }
    int4 = results["int4 g128 accuracy_level 4"]["ms_at_1_row"]["median"]
    for r in results.values():
        r["16_rows_vs_16_int4_steps"] = 16 * int4 / r["ms_at_16_rows"]["median"]
    emit({"what": "MatMulNBits (and fp32 / dynamic-int8 matmul) ms per call by rows (M), and the multiple "
                  "of the 1-row cost",
          "machine": {"cpu": cpu_name(), "platform": platform.platform(), "threads": args.threads},
          "versions": {"onnxruntime": onnxruntime.__version__},
          "K": args.k, "N": args.n, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
