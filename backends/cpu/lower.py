"""Lower traced (and rewritten) FX graphs to ONNX files sharing one weights file.

Each entry point becomes NAME.onnx. Every initializer larger than
INLINE_BYTES is stored once in weights.safetensors (deduplicated by content
across entry points) and referenced from the ONNX files as ONNX external data
pointing at its byte range inside the safetensors file. So the ONNX files load
on their own in any onnxruntime, and glmc's runtime maps the weights once and
hands the same buffers to both sessions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnxscript._framework_apis.torch_2_8 import optimize
from torch.onnx._internal.exporter._core import TorchTensor

from glmc.backends.cpu.lean import GLMC, build_step, fp32_linear_bytes
from glmc.backends.cpu.ops import OPSET, translation_table
from glmc.errors import GlmcError
from glmc.ir import PassContext
from glmc.modelcfg import tensor_layer
from glmc.trace import Traced
from glmc.weights import Const, Lazy, RowLayout, Transpose, WeightBook, source_names, write_safetensors

INLINE_BYTES = 1024
SMALL_ELEMENTS = 8192      # onnxscript's optimizer reads (folds, deduplicates) initializers up to this size
WEIGHTS_FILE = "weights.safetensors"


def export_onnx(traced: Traced, accuracy_level: int = 4) -> onnx.ModelProto:
    """One graph with its constants in memory as an optimised ModelProto (tests, small graphs)."""
    return _proto(optimize(export_ir(traced, accuracy_level)))


def _proto(model) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    # the exporter records a Python stack trace per node: useful while debugging the
    # exporter, dead weight in an artifact (most of the .onnx bytes)
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return proto


def export_ir(traced: Traced, accuracy_level: int = 4):
    """The entry point as an onnx_ir Model, not yet optimised (constants not folded)."""
    import torch

    from glmc.trace import export_settings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), export_settings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            traced.gm,
            traced.example_args,
            dynamic_shapes=traced.dynamic_shapes,
            input_names=traced.input_names,
            output_names=traced.output_names,
            dynamo=True,
            optimize=False,
            opset_version=OPSET,
            custom_translation_table=translation_table(accuracy_level),
            verbose=False,
        )
    return program.model


class _Weights:
    """The graphs' large initializers as recipes (glmc/weights.py), one entry per distinct
    recipe or content across entry points; written once to weights.safetensors."""

    def __init__(self, book: WeightBook, n_layers: int):
        self.book = book
        self.n_layers = n_layers
        self.entries: dict[str, Lazy] = {}
        self._by_key: dict = {}
        self.mapping: dict[str, dict[str, str]] = {}
        self._layers: dict[str, set] = {}       # entry -> where its source tensors sit in depth

    def _recipe(self, value) -> Lazy | None:
        """The recipe of an initializer's value; None for one small enough to stay inline."""
        raw = getattr(value, "raw", None)
        if isinstance(raw, torch.Tensor) and self.book.is_lazy(raw):
            return self.book.recipe(raw)
        if value.nbytes <= INLINE_BYTES:
            return None
        arr = np.ascontiguousarray(value.numpy())
        return Const(torch.from_numpy(arr))

    def _key(self, lazy: Lazy):
        if isinstance(lazy, Const):     # in memory: by content
            arr = lazy.value.numpy()
            return ("content", hashlib.sha256(arr.tobytes()).hexdigest(), str(arr.dtype), arr.shape)
        return lazy.key

    def fold_transposes(self, model) -> None:
        """Transpose(W) of a recipe W becomes the recipe Transpose(W): the exporter writes a linear's
        weight as Transpose + MatMul, and folding it in onnx would read the whole weight."""
        for node in list(model.graph):
            if node.op_type != "Transpose" or node.domain or len(node.inputs) != 1:
                continue
            src = node.inputs[0]
            perm = node.attributes.get("perm")
            if src is None or not src.is_initializer() or src.const_value is None:
                continue
            raw = getattr(src.const_value, "raw", None)
            if not (isinstance(raw, torch.Tensor) and self.book.is_lazy(raw) and raw.dim() == 2):
                continue
            if perm is not None and list(perm.as_ints()) != [1, 0]:
                continue
            lazy = Transpose(self.book.recipe(raw))
            placeholder = self.book.value(lazy)
            out = node.outputs[0]
            folded = ir.Value(name=f"{src.name}_t", shape=ir.Shape(list(placeholder.shape)),
                              type=ir.TensorType(src.dtype), const_value=TorchTensor(placeholder, name=f"{src.name}_t"))
            model.graph.register_initializer(folded)
            out.replace_all_uses_with(folded)
            model.graph.remove(node, safe=True)
            if not src.uses():
                model.graph.initializers.pop(src.name)

    def take(self, name: str, model) -> None:
        """Record the large initializers of one graph, before it is optimised."""
        names = self.mapping.setdefault(name, {})
        for init_name, value in list(model.graph.initializers.items()):
            lazy = self._recipe(value.const_value)
            layers = {tensor_layer(n, self.n_layers) for n in source_names(lazy)} if lazy is not None else set()
            if lazy is not None and not isinstance(lazy, Const) and math.prod(lazy.shape) <= SMALL_ELEMENTS \
                    and not _kernel_layout(lazy):
                # small enough for the optimizer to read (fold, deduplicate): computed now (a
                # glmc kernel's weight stays in the file: the runtime reads it there, in place)
                arr = np.ascontiguousarray(lazy.full().numpy()) if lazy.shape else lazy.rows(0, 1).numpy()
                value.const_value = ir.tensor(arr, name=init_name)
                lazy = Const(torch.from_numpy(arr)) if arr.nbytes > INLINE_BYTES else None
            if lazy is None:
                continue
            key = self._key(lazy)
            entry = self._by_key.get(key)
            if entry is None:
                entry = self._by_key[key] = f"w{len(self.entries)}"
                self.entries[entry] = lazy
            names[init_name] = entry
            self._layers.setdefault(entry, set()).update(layers)

    def layers(self) -> dict[str, int]:
        """entry -> the one depth its source tensors sit at (glmc.modelcfg.tensor_layer), for the
        entries that have one: how verification cuts a graph into layers (backends/cpu/layerwise.py).
        An entry shared by several layers (equal contents) or of no layer is left out."""
        return {e: next(iter(ls)) for e, ls in self._layers.items() if len(ls) == 1 and None not in ls}

    def write(self, models: dict, out_dir: Path) -> dict:
        """weights.safetensors, computed a chunk at a time; point each graph's initializers at it.
        Entries whose size is a multiple of 64 bytes go first, so each of them starts 64-byte
        aligned (the 16-bit linears' kernels read them in place)."""
        def unaligned(entry):
            lazy = self.entries[entry]
            return math.prod(lazy.shape) * torch.empty((), dtype=lazy.dtype).element_size() % 64 != 0

        ranges = write_safetensors({e: self.entries[e] for e in sorted(self.entries, key=unaligned)},
                                   out_dir / WEIGHTS_FILE)
        for name, model in models.items():
            for init_name, entry in self.mapping[name].items():
                value = model.graph.initializers.get(init_name)
                if value is None:           # dropped by the optimizer
                    continue
                offset, length = ranges[entry]
                value.const_value = ir.ExternalTensor(WEIGHTS_FILE, offset, length, value.const_value.dtype,
                                                      shape=value.const_value.shape, name=init_name,
                                                      base_dir=str(out_dir))
        return ranges


# --fp32-matmul auto runs fp32 linears on glmc's kernels from this many bytes of fp32 linear
# weights up. Below it the pieces and kernel calls a split step adds to each decode step cost
# more than the kernels gain: tiny-glm (5 MB of linears) decoded 3462 tok/s on them against
# 5616 on MatMul, small-glm (461 MiB) 1.05-1.27x faster than the best peer against MatMul's
# 0.86-1.01x. Between those two points the crossover is an estimate (a step's ~0.5 ms of
# pieces against a gain of 10-20% of its streaming time), not a measurement.
FP32_KERNELS_MIN_BYTES = 128 << 20


def lower(traced: list[Traced], out_dir: str | os.PathLike, ctx: PassContext, late=None) -> dict:
    """The entries as ONNX graphs over one weights file. The step graph, where it can be built,
    is the only one: it gives every position's logits too (the runtime asks for all rows).
    Where it is declined and extend keeps the last token's logits only, late("score")
    (glmc/compiler.py: late_entries) brings the score entry, exported beside extend."""
    out_dir = Path(out_dir)
    level = ctx.quant.accuracy_level
    weights = _Weights(ctx.weights, ctx.model_config.get("num_hidden_layers", 0))
    models, io = {}, {}
    declined = lora = None
    # 16-bit weights, and fp32 ones with --fp32-matmul glmc: every linear a Linear16 node, run by
    # TVM kernels (backends/cpu/linear16.py)
    fp32_glmc = ctx.dtype == "fp32" and ctx.quant.mode == "none" and ctx.quant.fp32_matmul == "glmc"
    fp32_auto = fp32_glmc and "fp32_matmul" in ctx.quant.auto          # chosen by default, not asked for
    linear16 = ctx.dtype if ctx.dtype in ("bf16", "fp16") else "fp32" if fp32_glmc else None
    if linear16 and ctx.lora_slots:
        raise GlmcError(f"--lora-slots is not built for --dtype {linear16} on the cpu target yet (use fp32)"
                        if linear16 != "fp32" else "--lora-slots runs onnxruntime's MatMul: --fp32-matmul onnxruntime")
    # int4 / int8 linears on glmc's TVM kernels (backends/cpu/linearq.py)
    linear4 = ctx.quant.mode == "int4" and ctx.quant.int4_matmul == "glmc"
    linear8 = ctx.quant.mode != "none" and ctx.quant.int8_matmul == "glmc"
    for option, wanted in (("--int4-matmul", linear4), ("--int8-matmul", linear8)):
        if wanted and ctx.lora_slots:
            raise GlmcError(f"--lora-slots is not built for {option} glmc yet (use {option} nbits)")
    queue = list(traced)
    while queue:
        t = queue.pop(0)
        if t.name == "extend":
            # the generation entry: built straight from the fused graph where it can be
            # (backends/cpu/lean.py), else exported by torch.onnx as it is
            def lean(linear16):
                return (None, "--kv-cache fp16", []) if ctx.quant.kv_cache == "fp16" else \
                    build_step(t, ctx.weights, ctx.model_config, level, ctx.lora_slots,
                               int8_dynamic=ctx.quant.int8_matmul == "dynamic", linear16=linear16, linear4=linear4,
                               linear8=linear8)

            if fp32_auto and fp32_linear_bytes(t) < FP32_KERNELS_MIN_BYTES:
                linear16 = None         # a small model: MatMul decodes it faster (FP32_KERNELS_MIN_BYTES)
            step, declined, adapters = lean(linear16)
            if step is None and fp32_auto:
                # glmc's fp32 kernels chosen by default, and a linear they cannot take (an output
                # width not a multiple of 8): the lean step on onnxruntime's MatMul instead
                linear16 = None
                step, declined, adapters = lean(None)
            # (--int4 / --int8-matmul glmc chosen by default: no error, MatMulNBits runs them)
            for option, wanted in (("--lora-slots", ctx.lora_slots), ("--int8-matmul dynamic",
                                                                      ctx.quant.int8_matmul == "dynamic"),
                                   (f"--dtype {ctx.dtype}", linear16 and linear16 != "fp32"),
                                   ("--fp32-matmul glmc", fp32_glmc and not fp32_auto),
                                   ("--int4-matmul glmc", linear4 and "int4_matmul" not in ctx.quant.auto),
                                   ("--int8-matmul glmc", linear8 and "int8_matmul" not in ctx.quant.auto)):
                if wanted and step is None:
                    raise GlmcError(f"{option} needs the lean step graph, which this model cannot use: {declined}")
            if ctx.lora_slots:
                slots, rank = ctx.lora_slots
                lora = {"slots": slots, "rank": rank, "linears": adapters}
            if step is not None:
                models["step"] = step
                io["step"] = {"inputs": [v.name for v in step.graph.inputs],
                              "outputs": [v.name for v in step.graph.outputs]}
                weights.take("step", step)
                continue
            if late is not None:        # every position's logits: the step graph cannot give them
                queue.append(late("score"))
        models[t.name] = model = export_ir(t, level)
        io[t.name] = {"inputs": t.input_names, "outputs": t.output_names}
        if ctx.quant.kv_cache == "fp16":
            store_cache_fp16(model)
        weights.fold_transposes(model)
        weights.take(t.name, model)
    # written before the optimizer runs, so whatever it reads is there
    ranges = weights.write(models, out_dir)
    entry_at = {offset: entry for entry, (offset, _) in ranges.items()}
    for name in models:
        if name != "step":          # built lean: nothing for the optimizer to fold
            models[name] = optimize(models[name])
    files, protos = {}, {}
    for name, model in models.items():
        proto = _proto(model)
        fname = f"{name}.onnx"
        onnx.save_model(proto, str(out_dir / fname))
        files[name], protos[name] = fname, proto
    # graph initializer -> weights entry, read back from the saved graphs (the optimizer renames)
    mapping = {name: {init.name: entry_at[int(_external(init)["offset"])] for init in proto.graph.initializer
                      if _external(init).get("location") == WEIGHTS_FILE} for name, proto in protos.items()}
    info = {
        "kind": "onnxruntime",
        "kv_cache": ctx.quant.kv_cache,
        "graphs": files,
        "weights": WEIGHTS_FILE,
        "initializers": mapping,
        "weight_layers": weights.layers(),
        "io": io,
        "op_histogram": {name: _onnx_histogram(m) for name, m in protos.items()},
    }
    if declined:
        info["step_declined"] = declined
    if linear16:
        info["linear16"] = {"dtype": linear16}
    hist = info["op_histogram"].get("step", {})
    if (linear4 or linear8) and any(hist.get(f"{GLMC}::{kind}") for kind in ("Linear4", "Linear8")):
        info["linearq"] = {kind: hist.get(f"{GLMC}::{kind}", 0) for kind in ("Linear4", "Linear8")}
    if lora:
        info["lora"] = lora
    return info


def _kernel_layout(lazy) -> bool:
    """A weight in a glmc kernel's layout (a 16-bit linear's, an int4 linear's codes or
    blocked scales): read by the runtime in place, never inlined into a graph."""
    return isinstance(lazy, RowLayout) or lazy.dtype in (torch.bfloat16, torch.float16)


def store_cache_fp16(model) -> None:
    """The graph's past_* inputs (the KV-cache buffers) become fp16. Each is read through a
    Slice of the slots in use; the Cast to fp32 goes after that Slice, so a step converts
    only the filled slots, and attention computes in fp32 as before."""
    graph = model.graph
    for value in graph.inputs:
        if not value.name.startswith("past_"):
            continue
        value.dtype = ir.DataType.FLOAT16
        users = [u for u, _ in value.uses()]
        sliced = all(u.op_type == "Slice" and u.inputs[0] is value for u in users)
        for src in ([u.outputs[0] for u in users] if sliced else [value]):
            src.dtype = ir.DataType.FLOAT16
            uses = list(src.uses())
            cast = ir.node("Cast", inputs=[src], attributes={"to": ir.DataType.FLOAT})
            cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT, src.shape
            if src.producer() is not None:
                graph.insert_after(src.producer(), cast)
            else:
                graph.insert_before(graph.node(0), cast)
            for user, index in uses:
                user.replace_input_with(index, cast.outputs[0])


def _external(init: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in init.external_data}


def _onnx_histogram(model: onnx.ModelProto) -> dict[str, int]:
    hist: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: -kv[1]))
