"""GPU backend shared by --target cuda and --target rocm: the rewritten graph as JSON
run by torch on the device, glmc ops through Triton kernels compiled ahead of time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glmc.errors import GlmcError
from glmc.target import Target


class GpuBackend:
    default_dtype = "fp16"
    dtypes = ("fp16", "bf16", "fp32")
    # the extend entry lowers cheaply (a JSON graph) and small chunks leave GPU matmul units idle
    chunked_prefill_default = True

    def __init__(self, target: Target):
        try:
            import triton  # noqa: F401
        except ImportError:
            raise GlmcError(f"target {target} needs Triton: pip install 'glmc[gpu]'") from None
        import glmc.backends.gpu.kernels  # noqa: F401  (registers the GPU lowerings)

        self.target = target

    def why_cannot_run_here(self) -> str | None:
        import torch

        from glmc.backends.triton._common import interpreting

        if torch.cuda.is_available() or interpreting():
            return None
        return (f"no GPU on this machine to run the {self.target} kernels; run it where the GPU is "
                f"(or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")

    def lower(self, graphs, out_dir: Path, ctx, late=None) -> dict:
        from glmc.backends.gpu.lower import lower

        return lower(graphs, out_dir, ctx)

    def load(self, artifact_dir: Path, manifest: dict, threads: int | None = None):
        from glmc.backends.gpu.runtime import GpuExecutor

        return GpuExecutor(Path(artifact_dir), manifest, threads)

    def hidden_states(self, graph, ctx, input_ids: list[int]) -> list[np.ndarray]:
        import torch

        from glmc.backends.gpu.graph import Program, to_json
        from glmc.backends.gpu.kernels import Configs, kernel_table
        from glmc.backends.gpu.lower import collect_weights
        from glmc.backends.gpu.runtime import pick_device
        from glmc.backends.triton._common import Launcher
        from glmc.dtypes import torch_dtype

        device = pick_device(self.target.vendor)
        dtype = torch_dtype(ctx.dtype)
        stored, mapping = collect_weights([graph], dtype, ctx.weights)
        weights = {target: stored[key].full().to(device) for target, key in mapping[graph.name].items()}
        program = Program(to_json(graph.gm), weights, kernel_table(Configs(), Launcher()), device, dtype)
        ids = torch.tensor([input_ids], device=device)
        with torch.no_grad():
            outs = program(ids, torch.ones_like(ids))
        n_layers = ctx.model_config["num_hidden_layers"]
        return [o[0].float().cpu().numpy() for o in outs[1 + 2 * n_layers:]]

    def tune(self, artifact: Path, manifest: dict, budget_s: float, db, timer, report: bool = False) -> dict:
        from glmc.backends.gpu.tune import tune

        return tune(artifact, manifest, budget_s, db, timer, report)

    def profile_decode(self, artifact: Path, manifest: dict, context: int, steps: int = 8) -> dict[str, float]:
        """Per-op milliseconds of one decode step, each op timed between device synchronisations
        (no CUDA graph), so the sum exceeds a graph-replayed step."""
        import torch

        from glmc.backends.gpu.runtime import GpuExecutor

        ex = GpuExecutor(Path(artifact), manifest)
        cache = ex.new_cache(1)
        ids = np.arange(5, 5 + context, dtype=np.int64)[None]
        ex.prefill(cache, ids, np.ones_like(ids))
        seconds: dict[str, float] = {}
        with torch.no_grad():
            for step in range(steps):
                tok = torch.tensor([[5]], device=ex.device)
                pos = torch.tensor([context + step], device=ex.device)
                outs = ex.program("decode")(tok, pos, cache.mask, *cache.past, profile=seconds)
                cache.store_step(outs[1:], torch.arange(1, device=ex.device), pos)
        per_op = {op: s * 1e3 / steps for op, s in seconds.items()}
        return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
