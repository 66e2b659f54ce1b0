"""Lower the rewritten graphs for --target cuda / rocm.

Writes, per entry point, NAME.graph.json (glmc/aten op names and JSON
arguments: nothing executable), one weights.safetensors in the compute dtype
(rotary tables and quantization scales stay fp32), and kernels/: the Triton
binaries cross-compiled for every requested arch for every launch the graphs
make at representative token counts, their index, and the kernel source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton

from glmc.backends.gpu.graph import Program, to_json
from glmc.backends.gpu.kernels import Configs, kernel_table
from glmc.backends.triton import aot
from glmc.backends.triton._common import Launcher
from glmc.dtypes import torch_dtype
from glmc.ir import PassContext
from glmc.modelcfg import head_dim
from glmc.registry import fp32_args
from glmc.trace import Traced
from glmc.weights import Cast, Const, Lazy, WeightBook, write_safetensors

WEIGHTS_FILE = "weights.safetensors"
AOT_TOKENS = (1, 16, 128)      # prefill token counts whose launches are compiled ahead of time


def _weight(gm, target: str) -> torch.Tensor:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value.detach()


def collect_weights(traced: list[Traced], dtype: torch.dtype, book: WeightBook) -> tuple[dict, dict]:
    """-> (recipes by stored key, per-graph {get_attr target: key}); float tensors cast to `dtype`
    unless they are rotary tables or quantization scales (a cast to fp16 refuses values beyond
    its range, naming the tensor, when it is computed)."""
    stored: dict[str, Lazy] = {}
    by_key: dict = {}
    mapping: dict[str, dict[str, str]] = {}
    keep_fp32 = fp32_args()
    for t in traced:
        keep = set()
        for n in t.gm.graph.nodes:
            if n.op == "call_function":
                for i, a in enumerate(n.args):
                    if isinstance(a, torch.fx.Node) and a.op == "get_attr" and (str(n.target), i) in keep_fp32:
                        keep.add(a.target)
        names = mapping.setdefault(t.name, {})
        for n in t.gm.graph.nodes:
            if n.op != "get_attr":
                continue
            w = _weight(t.gm, n.target)
            lazy = book.recipe(w)
            if w.is_floating_point() and n.target not in keep and w.dtype != dtype:
                lazy = Cast(lazy, dtype, n.target)
            ident = lazy.key if not isinstance(lazy, Const) else (
                w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), w.dtype)
            key = by_key.get(ident)
            if key is None:
                key = by_key[ident] = f"w{len(stored)}"
                stored[key] = lazy
            names[n.target] = key
    return stored, mapping


def record_launches(graphs: dict, weight_shapes: dict, mapping: dict, dtype_name: str, model_config: dict,
                    max_seq_len: int, configs: Configs) -> list:
    """Run every graph once on the meta device at representative shapes; collect the kernel launches.

    weight_shapes: stored key -> (shape, torch dtype); mapping: entry -> {graph weight name: key}."""
    dtype = torch_dtype(dtype_name)
    L = model_config["num_hidden_layers"]
    Hkv = model_config["num_key_value_heads"]
    D = head_dim(model_config)
    S = max_seq_len
    meta_weights = {k: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in weight_shapes.items()}
    recorder = Launcher(record=True)
    table = kernel_table(configs, recorder)

    def meta(*shape, dt=torch.int64):
        return torch.empty(shape, dtype=dt, device="meta")

    for name, graph in graphs.items():
        weights = {target: meta_weights[key] for target, key in mapping[name].items()}
        program = Program(graph, weights, table, torch.device("meta"), dtype)
        past = [meta(1, Hkv, S, D, dt=dtype) for _ in range(2 * L)]
        for T in sorted({min(T, S) for T in AOT_TOKENS}):
            if name == "decode":
                program(meta(1, 1), meta(1), meta(1, S), *past)
                break
            if name == "extend":
                if T >= 2:
                    program(meta(1, T), meta(1, T), meta(1), meta(1, S), *past)
                continue
            program(meta(1, T), meta(1, T))
    return list(recorder.recorded)


def compile_kernels(out_dir: Path, graphs: dict, weight_shapes: dict, mapping: dict, dtype_name: str,
                    model_config: dict, max_seq_len: int, archs: list[str], tuned: dict | None) -> dict:
    """kernels/: AOT binaries of every launch for every arch, their index, the kernel source."""
    launches = record_launches(graphs, weight_shapes, mapping, dtype_name, model_config, max_seq_len,
                               Configs(tuned))
    kernels_dir = out_dir / "kernels"
    entries = aot.compile_launches(launches, archs, kernels_dir)
    aot.copy_sources(kernels_dir / "src")
    index = {"triton_version": triton.__version__, "source_sha256": aot.source_sha256(), "archs": archs,
             "entries": entries}
    (kernels_dir / "index.json").write_text(json.dumps(index, indent=1))
    return {"index": "kernels/index.json", "binaries": len(entries), "distinct_launches": len({e["key"] for e in entries})}


def lower(traced: list[Traced], out_dir: str | os.PathLike, ctx: PassContext) -> dict:
    out_dir = Path(out_dir)
    archs = list(ctx.target.archs)
    dtype = torch_dtype(ctx.dtype)
    stored, mapping = collect_weights(traced, dtype, ctx.weights)
    write_safetensors(stored, out_dir / WEIGHTS_FILE)
    graphs, files = {}, {}
    for t in traced:
        graphs[t.name] = to_json(t.gm)
        files[t.name] = f"{t.name}.graph.json"
        (out_dir / files[t.name]).write_text(json.dumps(graphs[t.name]))
    # built with each kernel's default config; `glmc tune` measures, stores its choices and rebuilds
    kernels = compile_kernels(out_dir, graphs, {k: (tuple(v.shape), v.dtype) for k, v in stored.items()}, mapping,
                              ctx.dtype, ctx.model_config, ctx.max_seq_len, archs, None)
    hist = {}
    for name, g in graphs.items():
        h: dict[str, int] = {}
        for n in g["nodes"]:
            if n["op"] == "call":
                h[n["target"]] = h.get(n["target"], 0) + 1
        hist[name] = dict(sorted(h.items(), key=lambda kv: -kv[1]))
    return {
        "kind": "triton", "vendor": ctx.target.vendor, "archs": archs, "dtype": ctx.dtype,
        "graphs": files, "weights": WEIGHTS_FILE, "weight_names": mapping,
        "io": {t.name: {"inputs": t.input_names, "outputs": t.output_names} for t in traced},
        "kernels": kernels,
        "tuned_configs": {},
        "op_histogram": hist,
    }
