"""Does onnxruntime have a fast 16-bit-weight matmul on this CPU? (issue 14, item 3)

    python bench/cpu_16bit.py [--k 4096] [--n 8192] [--threads 2]
                              [--out bench/results/cpu-16bit-matmul.json]

A CPU `--dtype bf16/fp16` is worth shipping only if a step reading 16-bit weights beats
one reading fp32 weights: decode is bound by the bytes it reads, so the goal is ~2x. This
times, in one run, one-node onnxruntime sessions over the same (K, N) weight:

  fp32            MatMul, fp32 weights (what a glmc fp32 artifact runs)
  fp16            MatMul, fp16 activations and weights (onnxruntime's fp16 kernel)
  fp16 cast       fp32 activations, fp16 weights through a Cast in the graph
  bf16            MatMul in bfloat16 (recorded as refused where onnxruntime has no kernel)
  int8 / int4     com.microsoft.MatMulNBits, group 128, accuracy level 4 (the quantized
                  alternatives glmc ships)

at M = 1 row (decode: GB/s of the weight's bytes, and that as a fraction of the same run's
read-bandwidth probe) and M = 128 rows (prefill: GFLOP/s). 7 rounds of 10 calls after 3
warm-up calls; min / median / max over rounds. The CPU's 16-bit instruction sets are
recorded beside the numbers (F16C converts, AVX512-FP16 / AVX512-BF16 / AMX compute).
"""

from __future__ import annotations

import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from matmul_rows import nbits_session  # noqa: E402  (bench/, the script's own directory)
from report_json import emit, matmul_args  # noqa: E402

ROWS = (1, 128)
FLAGS = ("avx2", "f16c", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16")


def _weights(K: int, N: int):
    import numpy as np

    return (np.random.default_rng(0).standard_normal((K, N)) * 0.02).astype(np.float32)


def _session(kind: str, w, threads: int):
    """(session, input dtype, weight bytes) for one variant over weight w (K, N) fp32."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from glmc.backends.cpu.tune import matmul_session

    K, N = w.shape
    if kind == "fp32":
        return matmul_session(helper.make_node("MatMul", ["x", "w"], ["y"]), K, N, {"w": w}, threads), np.float32, w.nbytes
    if kind in ("int8", "int4"):
        bits = 8 if kind == "int8" else 4
        # the packed bytes and one fp32 scale per 128 weights
        return nbits_session(K, N, bits, 128, 4, threads), np.float32, K * N * bits // 8 + K * N // 128 * 4
    if kind == "bf16":          # onnx has no numpy bfloat16: the weight as its top 16 bits
        raw = (w.view(np.uint32) >> 16).astype(np.uint16)
        init = helper.make_tensor("w", T.BFLOAT16, [K, N], raw.tobytes(), raw=True)
        elem, x_dtype, nbytes = T.BFLOAT16, None, raw.nbytes
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    else:
        init = numpy_helper.from_array(w.astype(np.float16), "w")
        nbytes = w.size * 2
        if kind == "fp16":
            elem, x_dtype = T.FLOAT16, np.float16
            nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        else:                   # "fp16 cast"
            elem, x_dtype = T.FLOAT, np.float32
            nodes = [helper.make_node("Cast", ["w"], ["wf"], to=T.FLOAT), helper.make_node("MatMul", ["x", "wf"], ["y"])]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", elem, ["M", K])],
                              [helper.make_tensor_value_info("y", elem, ["M", N])], [init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]), x_dtype, nbytes


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    m = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    have = set(m.group(1).split()) if m else set()
    return [f for f in FLAGS if f in have]


def main(argv=None) -> int:
    import numpy as np
    import onnxruntime

    from glmc.measure import cpu_name, read_bandwidth_gbs, summarize

    args = matmul_args(__doc__, 4096, 8192, argv)
    w = _weights(args.k, args.n)
    bandwidth = [read_bandwidth_gbs()]
    results = {}
    for kind in ("fp32", "fp16", "fp16 cast", "bf16", "int8", "int4"):
        try:
            sess, x_dtype, nbytes = _session(kind, w, args.threads)
            if x_dtype is None:
                raise RuntimeError("no numpy input type for bfloat16 activations")
            inputs = {m: {"x": np.random.default_rng(m).standard_normal((m, args.k)).astype(x_dtype)} for m in ROWS}
            for m in ROWS:
                for _ in range(3):
                    sess.run(None, inputs[m])
        except Exception as e:  # noqa: BLE001 - a variant onnxruntime refuses is a result, not a failure
            results[kind] = {"refused": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        per_round = {m: [] for m in ROWS}
        for _ in range(7):
            for m in ROWS:
                t0 = time.perf_counter()
                for _ in range(10):
                    sess.run(None, inputs[m])
                per_round[m].append((time.perf_counter() - t0) / 10)
        one = summarize(per_round[1])
        results[kind] = {
            "weight_bytes": nbytes,
            "ms_at_1_row": {k: v * 1e3 for k, v in one.items() if k != "n"},
            "gbs_at_1_row": {"min": nbytes / one["max"] / 1e9, "median": nbytes / one["median"] / 1e9,
                             "max": nbytes / one["min"] / 1e9},
            f"gflops_at_{ROWS[1]}_rows": 2 * ROWS[1] * args.k * args.n / float(np.median(per_round[ROWS[1]])) / 1e9,
        }
        del sess
        bandwidth.append(read_bandwidth_gbs())
    probe = float(np.median(bandwidth))
    for r in results.values():
        if "gbs_at_1_row" in r:
            r["fraction_of_probe_at_1_row"] = r["gbs_at_1_row"]["median"] / probe
    fp32 = results["fp32"]["ms_at_1_row"]["median"]
    for r in results.values():
        if "ms_at_1_row" in r:
            r["decode_speed_vs_fp32"] = fp32 / r["ms_at_1_row"]["median"]
    emit({"what": "one-node onnxruntime matmuls over a (K, N) weight stored fp32, 16-bit or int8/int4",
          "machine": {"cpu": cpu_name(), "platform": platform.platform(), "threads": args.threads,
                      "cpu_flags": _cpu_flags()},
          "versions": {"onnxruntime": onnxruntime.__version__},
          "K": args.k, "N": args.n,
          "read_bandwidth_gbs": {"probes": bandwidth, "median": probe},
          "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
