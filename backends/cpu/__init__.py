"""CPU backend: the traced graphs lowered to ONNX and run by onnxruntime."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from glmc.target import Target


class CpuBackend:
    default_dtype = "fp32"
    # bf16 / fp16: 16-bit linear weights run by TVM kernels (backends/cpu/linear16.py)
    dtypes = ("fp32", "bf16", "fp16")
    # cpu artifacts always carry the extend entry (it is their one generation entry);
    # chunking itself stays opt-in at run time (prefill_chunk / glmc tune)
    chunked_prefill_default = False

    def __init__(self, target: Target):
        self.target = target

    def why_cannot_run_here(self) -> str | None:
        return None

    def lower(self, graphs, out_dir: Path, ctx, late=None) -> dict:
        from glmc.backends.cpu.lower import lower

        return lower(graphs, out_dir, ctx, late)

    def load(self, artifact_dir: Path, manifest: dict, threads: int | None = None):
        from glmc.backends.cpu.runtime import CpuExecutor

        return CpuExecutor(Path(artifact_dir), manifest, threads)

    def hidden_states(self, graph, ctx, input_ids: list[int]) -> list[np.ndarray]:
        import onnxruntime as ort

        from glmc.backends.cpu.lower import lower

        with tempfile.TemporaryDirectory() as d:
            files = lower([graph], d, ctx)["graphs"]
            sess = ort.InferenceSession(f"{d}/{files[graph.name]}", providers=["CPUExecutionProvider"])
            outs = sess.run(None, {"input_ids": np.array([input_ids]),
                                   "attention_mask": np.ones((1, len(input_ids)), np.int64)})
        n_layers = ctx.model_config["num_hidden_layers"]
        return [o[0] for o in outs[1 + 2 * n_layers:]]

    def tune(self, artifact: Path, manifest: dict, budget_s: float, db, timer, report: bool = False) -> dict:
        from glmc.backends.cpu.tune import tune

        return tune(artifact, manifest, budget_s, db, timer, report)

    def profile_decode(self, artifact: Path, manifest: dict, context: int, steps: int = 8) -> dict[str, float]:
        """Per-op-type milliseconds of one decode step, from onnxruntime's profiler."""
        from glmc.runtime import Runtime

        rt = Runtime(artifact, verify=False)
        ex = rt.executor
        if manifest["backend"].get("linear16") or manifest["backend"].get("linearq"):   # pieces and TVM kernels
            return _profile_split(rt, context, steps)
        with tempfile.TemporaryDirectory() as d:
            ids = list(range(5, 5 + context))
            cache, last = rt.prefill([ids])
            # a profiling session from here on: decode steps only (the cache is the runtime's)
            ex.profile(ex.generation, str(Path(d) / "decode"))
            pos, tok = np.array([context]), int(last[0].argmax())
            for _ in range(steps):
                tok = int(ex.decode(cache, np.array([[tok]]), pos)[0, 0].argmax())
                pos += 1
            events = json.loads(Path(ex.sessions[ex.generation].end_profiling()).read_text())
        per_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3 / steps
        return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def _profile_split(rt, context: int, steps: int) -> dict[str, float]:
    """Milliseconds per decode step in a 16-bit artifact's TVM kernels and its onnxruntime
    pieces (the rest of the step is the runtime's own work), from the step's plan."""
    ex = rt.executor
    split = ex.sessions[ex.generation]
    ids = list(range(5, 5 + context))
    cache, last = rt.prefill([ids])
    pos, tok = np.array([context]), int(last[0].argmax())
    split.timings = {}
    try:
        for n in range(steps + 2):              # the plan is made on a binding's second step
            if n == 2:
                split.timings.clear()
            tok = int(ex.decode(cache, np.array([[tok]]), pos)[0, 0].argmax())
            pos += 1
        per_op = {kind: s * 1e3 / steps for kind, s in split.timings.items()}
    finally:
        split.timings = None
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
