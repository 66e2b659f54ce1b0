"""GPU executor: the artifact's graphs run by torch on the device, every glmc op and
linear through glmc's Triton kernels (AOT binaries when the arch and Triton version
match, else JIT from glmc's installed kernel source).

The KV cache is preallocated per batch size, (B, Hkv, max_seq_len, D) per layer,
and reused across calls. On CUDA the decode step (graph + cache update) is
captured once per batch size in a CUDA graph and replayed.

Without a GPU, TRITON_INTERPRET=1 runs the same executor on CPU tensors (tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import triton

from glmc.backends.gpu.graph import Program
from glmc.backends.gpu.kernels import Configs, kernel_table
from glmc.backends.kv import store_decode_kv, store_kv
from glmc.backends.triton import aot
from glmc.backends.triton._common import Launcher, interpreting
from glmc.dtypes import torch_dtype
from glmc.errors import GlmcError, warn
from glmc.modelcfg import head_dim
from glmc.settings import cuda_graph_enabled


def pick_device(vendor: str) -> torch.device:
    if torch.cuda.is_available():
        is_hip = torch.version.hip is not None
        if is_hip != (vendor == "rocm"):
            have = "ROCm/HIP" if is_hip else "CUDA"
            raise GlmcError(f"this artifact targets {vendor}, but torch here runs {have}; recompile with --target "
                            f"{'rocm' if is_hip else 'cuda'}")
        return torch.device("cuda")
    if interpreting():
        return torch.device("cpu")
    raise GlmcError(f"this artifact targets {vendor} and needs a GPU; torch sees none here "
                    f"(set TRITON_INTERPRET=1 to run its kernels on the CPU, slowly, for testing)")


class KVCache:
    def __init__(self, batch: int, n_layers: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        self.batch = batch
        self.k = [torch.zeros((batch, kv_heads, capacity, head_dim), dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros_like(self.k[0]) for _ in range(n_layers)]
        self.past = [t for pair in zip(self.k, self.v) for t in pair]
        self.mask = torch.zeros((batch, capacity), dtype=torch.int64, device=device)
        self.graph = None     # captured CUDA graph of the decode step, with its static inputs/outputs

    store = store_kv              # prefill / extend outputs into their slots
    store_step = store_decode_kv  # a decode step's one new token per row


class GpuExecutor:
    def __init__(self, artifact_dir: Path, manifest: dict, threads: int | None = None, observer=None):
        from safetensors.torch import load_file

        self._dir = Path(artifact_dir)
        backend = manifest["backend"]
        self.device = pick_device(backend["vendor"])
        self.dtype = torch_dtype(backend["dtype"])
        cfg = manifest["model"]["config"]
        self.n_layers = cfg["num_hidden_layers"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.head_dim = head_dim(cfg)
        self.capacity = manifest["max_seq_len"]
        self.notes: list[str] = []
        self.launcher = Launcher(self._prebuilt(backend))     # this executor's kernels, AOT where possible
        weights = load_file(str(self._dir / backend["weights"]), device=str(self.device))
        self._table = kernel_table(Configs(backend.get("tuned_configs")), self.launcher, observer)
        self._programs = {}
        for name, fname in backend["graphs"].items():
            graph = json.loads((self._dir / fname).read_text())
            named = {target: weights[key] for target, key in backend["weight_names"][name].items()}
            self._programs[name] = Program(graph, named, self._table, self.device, self.dtype)
        self._caches: dict[int, KVCache] = {}
        self.use_cuda_graph = self.device.type == "cuda" and cuda_graph_enabled()

    def _note(self, message: str) -> None:
        self.notes.append(message)
        warn(message)

    def _prebuilt(self, backend: dict) -> dict:
        """Launch key -> AOT runner for this GPU's arch; {} (JIT) when the binaries do not apply."""
        index_path = self._dir / backend["kernels"]["index"]
        index = json.loads(index_path.read_text())
        if self.device.type != "cuda":
            return {}
        arch = aot.device_arch()
        if index.get("triton_version") != triton.__version__:
            self._note(f"kernels were compiled by Triton {index.get('triton_version')}, this is Triton "
                       f"{triton.__version__}: JIT-compiling glmc's kernel source instead of the stored binaries")
        elif arch not in index.get("archs", []):
            self._note(f"the artifact has binaries for {', '.join(index.get('archs', []))}, this GPU is {arch}: "
                       f"JIT-compiling glmc's kernel source")
        elif index.get("source_sha256") != aot.source_sha256():
            self._note("glmc's installed kernel source differs from the artifact's: JIT-compiling the installed source")
        else:
            return aot.load_prebuilt(index_path.parent, index, arch)
        return {}

    def program(self, name: str) -> Program:
        return self._programs[name]

    # ---- executor interface -------------------------------------------------------------------

    def new_cache(self, batch: int) -> KVCache:
        """The preallocated cache for this batch size (reused: its mask is cleared)."""
        cache = self._caches.get(batch)
        if cache is None:
            cache = self._caches[batch] = KVCache(batch, self.n_layers, self.kv_heads, self.capacity,
                                                  self.head_dim, self.dtype, self.device)
        cache.mask.zero_()
        return cache

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def prefill(self, cache: KVCache, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        mask = self._t(attention_mask)
        with torch.no_grad():
            outs = self._programs["prefill"](self._t(input_ids), mask)
            cache.store(outs[1:], 0, mask)
            logits = outs[0]
            if logits.shape[1] != 1:
                logits = logits[torch.arange(len(logits)), mask.sum(1) - 1].unsqueeze(1)
        return logits[:, 0].float().cpu().numpy()

    def extend(self, cache: KVCache, input_ids: np.ndarray, attention_mask: np.ndarray, start: int) -> np.ndarray:
        B, C = input_ids.shape
        mask = self._t(attention_mask)
        with torch.no_grad():
            pos = torch.full((B,), start, dtype=torch.int64, device=self.device)
            outs = self._programs["extend"](self._t(input_ids), mask, pos, cache.mask, *cache.past)
            cache.store(outs[1:], start, mask)
        return outs[0].float().cpu().numpy()

    def release_scoring(self) -> None:
        """Nothing to drop: the GPU programs share one copy of the weights."""

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        name = "score" if "score" in self._programs else "prefill"
        with torch.no_grad():
            out = self._programs[name](self._t(input_ids), self._t(attention_mask))[0]
        return out.float().cpu().numpy()

    def _decode_step(self, cache: KVCache, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        outs = self._programs["decode"](ids, pos, cache.mask, *cache.past)
        cache.store_step(outs[1:], torch.arange(cache.batch, device=self.device), pos)
        return outs[0]

    def decode(self, cache: KVCache, input_ids: np.ndarray, position: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            if not self.use_cuda_graph:
                return self._decode_step(cache, self._t(input_ids), self._t(position)).float().cpu().numpy()
            if cache.graph is None:
                cache.graph = self._capture(cache)
            graph, ids, pos, out = cache.graph
            ids.copy_(self._t(input_ids))
            pos.copy_(self._t(position))
            graph.replay()
            return out.float().cpu().numpy()

    def _capture(self, cache: KVCache):
        """Capture the decode step for this cache. Warm-up writes slot 0, which every prefill overwrites."""
        saved = cache.mask.clone()
        ids = torch.zeros((cache.batch, 1), dtype=torch.int64, device=self.device)
        pos = torch.zeros((cache.batch,), dtype=torch.int64, device=self.device)
        k0 = [(k[:, :, 0].clone(), v[:, :, 0].clone()) for k, v in zip(cache.k, cache.v)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):        # compiles every kernel before capture
                self._decode_step(cache, ids, pos)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._decode_step(cache, ids, pos)
        for (k, v), (k_saved, v_saved) in zip(zip(cache.k, cache.v), k0):
            k[:, :, 0] = k_saved
            v[:, :, 0] = v_saved
        cache.mask.copy_(saved)
        return graph, ids, pos, out

