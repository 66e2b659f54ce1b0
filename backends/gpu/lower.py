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
from glmc.backends.triton._common import LAUNCHER
from glmc.errors import GlmcError
from glmc.ir import PassContext
from glmc.trace import Traced

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHTS_FILE = "weights.safetensors"
KEEP_FP32 = {("glmc.rotary.default", 2), ("glmc.rotary.default", 3), ("glmc.linear_nbits.default", 2)}
FP16_MAX = 65504.0
AOT_TOKENS = (1, 16, 128)      # prefill token counts whose launches are compiled ahead of time


def _weight(gm, target: str) -> torch.Tensor:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value.detach()


def collect_weights(traced: list[Traced], dtype: torch.dtype) -> tuple[dict, dict]:
    """-> (stored tensors by key, per-graph {get_attr target: key}); float tensors cast to `dtype`
    unless they are rotary tables or quantization scales. Refuses fp16 overflow, naming the tensor."""
    stored: dict[str, torch.Tensor] = {}
    by_storage: dict[tuple, str] = {}
    mapping: dict[str, dict[str, str]] = {}
    for t in traced:
        keep = set()
        for n in t.gm.graph.nodes:
            if n.op == "call_function":
                for i, a in enumerate(n.args):
                    if isinstance(a, torch.fx.Node) and a.op == "get_attr" and (str(n.target), i) in KEEP_FP32:
                        keep.add(a.target)
        names = mapping.setdefault(t.name, {})
        for n in t.gm.graph.nodes:
            if n.op != "get_attr":
                continue
            w = _weight(t.gm, n.target)
            ident = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), n.target in keep)
            key = by_storage.get(ident)
            if key is None:
                if w.is_floating_point() and n.target not in keep and w.dtype != dtype:
                    if dtype == torch.float16 and w.numel() and w.abs().max().item() > FP16_MAX:
                        raise GlmcError(f"weight {n.target} holds values beyond the fp16 range (|w| max "
                                        f"{w.abs().max().item():.3g} > 65504); compile with --dtype bf16 or fp32")
                    w = w.to(dtype)
                key = by_storage[ident] = f"w{len(stored)}"
                stored[key] = w.contiguous()
            names[n.target] = key
    return stored, mapping


def record_launches(graphs: dict, stored: dict, mapping: dict, traced: list[Traced], ctx: PassContext,
                    configs: Configs) -> list:
    """Run every graph once on the meta device at representative shapes; collect the kernel launches."""
    dtype = DTYPES[ctx.dtype]
    cfg = ctx.options["model_config"]
    L = cfg["num_hidden_layers"]
    Hkv = cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    S = ctx.options["max_seq_len"]
    meta_weights = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in stored.items()}
    table = kernel_table(configs)
    launches = []
    with LAUNCHER.recording() as rec:
        for t in traced:
            weights = {target: meta_weights[key] for target, key in mapping[t.name].items()}
            program = Program(graphs[t.name], weights, table, torch.device("meta"), dtype)
            if t.name == "decode":
                past = [torch.empty((1, Hkv, S, D), dtype=dtype, device="meta") for _ in range(2 * L)]
                program(torch.empty((1, 1), dtype=torch.int64, device="meta"),
                        torch.empty((1,), dtype=torch.int64, device="meta"),
                        torch.empty((1, S), dtype=torch.int64, device="meta"), *past)
            else:
                for T in sorted({min(T, S) for T in AOT_TOKENS}):
                    ids = torch.empty((1, T), dtype=torch.int64, device="meta")
                    program(ids, torch.empty((1, T), dtype=torch.int64, device="meta"))
        launches = list(rec)
    return launches


def lower(traced: list[Traced], out_dir: str | os.PathLike, ctx: PassContext) -> dict:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    kind, archs = aot.parse_target(ctx.target)
    dtype = DTYPES[ctx.dtype]
    stored, mapping = collect_weights(traced, dtype)
    save_file(stored, str(out_dir / WEIGHTS_FILE))
    graphs, files = {}, {}
    for t in traced:
        graphs[t.name] = to_json(t.gm)
        files[t.name] = f"{t.name}.graph.json"
        (out_dir / files[t.name]).write_text(json.dumps(graphs[t.name]))
    configs = Configs(ctx.options.get("tuned_configs"))
    launches = record_launches(graphs, stored, mapping, traced, ctx, configs)
    kernels_dir = out_dir / "kernels"
    entries = aot.compile_launches(launches, archs, kernels_dir)
    aot.copy_sources(kernels_dir / "src")
    index = {"triton_version": triton.__version__, "source_sha256": aot.source_sha256(), "archs": archs,
             "entries": entries}
    (kernels_dir / "index.json").write_text(json.dumps(index, indent=1))
    hist = {}
    for name, g in graphs.items():
        h: dict[str, int] = {}
        for n in g["nodes"]:
            if n["op"] == "call":
                h[n["target"]] = h.get(n["target"], 0) + 1
        hist[name] = dict(sorted(h.items(), key=lambda kv: -kv[1]))
    return {
        "kind": "triton", "vendor": kind, "archs": archs, "dtype": ctx.dtype,
        "graphs": files, "weights": WEIGHTS_FILE, "weight_names": mapping,
        "io": {t.name: {"inputs": t.input_names, "outputs": t.output_names} for t in traced},
        "kernels": {"index": "kernels/index.json", "binaries": len(entries),
                    "distinct_launches": len({e["key"] for e in entries})},
        "tuned_configs": {k: v for k, v in (ctx.options.get("tuned_configs") or {}).items()},
        "op_histogram": hist,
    }
