"""Tuning for the cpu target: onnxruntime's thread count (decode step) and the prefill
chunk size (prefill tokens/s against the number of tokens M), plus a MatMul throughput
map over the model's shapes for the report."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from glmc.autotune import DeviceKey, Tuner
from glmc.errors import warn
from glmc.measure import cpu_name
from glmc.modelcfg import head_dim


def cpu_device_key() -> DeviceKey:
    import onnxruntime
    import triton

    from glmc.backends.cpu.runtime import default_threads

    return DeviceKey(f"{cpu_name()} x{default_threads()}", platform.machine(), f"onnxruntime {onnxruntime.__version__}",
                     triton.__version__)


def token_counts(max_m: int) -> list[int]:
    out, m = [], 16
    while m <= max_m:
        out.append(m)
        m *= 2
    return out


def choose_chunk(throughput: dict[int, float], within: float = 0.95) -> int:
    """The smallest token count whose throughput is within `within` of the best: the
    chunk that keeps the matmuls in their efficient (square-ish) region without
    needless padding."""
    best = max(throughput.values())
    return min(m for m, v in throughput.items() if v >= within * best)


def tune(artifact: Path, manifest: dict, budget_s: float, db, timer, report: bool = False, max_m: int = 512) -> dict:
    from glmc.backends.cpu.runtime import CpuExecutor, default_threads

    tuner = Tuner(db, cpu_device_key(), budget_s, timer=timer)
    cfg = manifest["model"]["config"]
    model_shape = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"])
    quant = manifest["quant"]
    ncpu = default_threads()
    executors = {}

    def executor(threads):
        if threads not in executors:
            executors[threads] = CpuExecutor(artifact, manifest, threads)
        return executors[threads]

    def decode_step(threads):
        ex = executor(threads)
        cache = ex.new_cache(1)
        ids, pos = np.array([[5]], np.int64), np.array([3], np.int64)
        return lambda: ex.decode(cache, ids, pos)

    thread_choices = sorted({t for t in (1, 2, 4, 8, 16, ncpu) if t <= ncpu})
    threads = tuner.choose("cpu_threads", model_shape, "fp32", quant,
                           {str(t): decode_step(t) for t in thread_choices})
    best_threads = int(threads["choice"])

    ex = executor(best_threads)
    limit = min(max_m, manifest["max_seq_len"])
    throughput = {}
    for m in token_counts(limit):
        ids = np.full((1, m), 5, np.int64)
        mask = np.ones((1, m), np.int64)
        cache = ex.new_cache(1)
        r = tuner.choose("cpu_prefill", (*model_shape, m), "fp32", quant,
                         {"onnxruntime": lambda ids=ids, mask=mask, cache=cache: ex.prefill(cache, ids, mask)})
        throughput[m] = m / r["seconds"]
    tuner.save()
    chunk = choose_chunk(throughput) if throughput else None
    if not {"extend", "step"} & set(manifest["backend"]["graphs"]):
        warn(f"{artifact}: built without --chunked-prefill: the chunk size is recorded but the "
             "runtime prefills in one call")
    result = {"target": "cpu", "device": tuner.device.prefix(), "threads": best_threads,
              "thread_timings_s": threads["timings"], "prefill_tokens_per_s": throughput,
              "prefill_chunk": chunk, "measured": tuner.measured, "reused": tuner.reused}
    if not report:
        return result
    values = matmul_throughput(cfg, best_threads, tuner, max_m=min(512, manifest["max_seq_len"]))
    result["matmul_gflops"] = {f"{m}x{n}": v for (m, n), v in values.items()}
    result["heatmap"] = (values, "GFLOP/s",
                         f"onnxruntime MatMul GFLOP/s, {best_threads} threads; prefill chunk {chunk}")
    return result


def matmul_session(node, K: int, N: int, weights: dict, threads: int):
    """An onnxruntime session of one matmul-like node: x (M, K) fp32 -> y (M, N), its
    constant inputs `weights` (name -> array), on `threads` threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([node], "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
                              [numpy_helper.from_array(a, name) for name, a in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def matmul_throughput(cfg: dict, threads: int, tuner: Tuner, max_m: int = 512) -> dict[tuple[int, int], float]:
    """GFLOP/s of onnxruntime MatMul over the model's (N, K) pairs and token counts M."""
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    D = head_dim(cfg)
    pairs = sorted({(cfg["num_attention_heads"] * D + 2 * cfg["num_key_value_heads"] * D, H), (H, H), (2 * I, H), (H, I)})
    from onnx import helper

    out = {}
    for N, K in pairs:
        w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
        sess = matmul_session(helper.make_node("MatMul", ["x", "w"], ["y"]), K, N, {"w": w}, threads)
        for m in [1] + token_counts(max_m):
            x = np.ones((m, K), np.float32)
            r = tuner.choose("cpu_matmul", (m, N, K), "fp32", "none", {"onnxruntime": lambda x=x: sess.run(None, {"x": x})})
            out[(m, N)] = 2 * m * N * K / r["seconds"] / 1e9
    tuner.save()
    return out
