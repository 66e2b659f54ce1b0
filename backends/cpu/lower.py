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
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
from glmc.backends.cpu.ops import OPSET, translation_table
from onnx import numpy_helper

from glmc.ir import PassContext
from glmc.safetensors_check import data_start, read_header
from glmc.trace import Traced

INLINE_BYTES = 1024
WEIGHTS_FILE = "weights.safetensors"


def export_onnx(traced: Traced, accuracy_level: int = 4) -> onnx.ModelProto:
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            traced.gm,
            traced.example_args,
            dynamic_shapes=traced.dynamic_shapes,
            input_names=traced.input_names,
            output_names=traced.output_names,
            dynamo=True,
            optimize=True,
            opset_version=OPSET,
            custom_translation_table=translation_table(accuracy_level),
            verbose=False,
        )
    model = program.model_proto
    # the exporter records a Python stack trace per node: useful while debugging the
    # exporter, dead weight in an artifact (most of the .onnx bytes)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return model


class _WeightStore:
    """Initializers moved out of the ONNX protos as soon as each graph is exported,
    deduplicated by content, so a compile holds one copy of the weights (not one per
    entry point) before they are written to weights.safetensors."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self._by_digest: dict[str, str] = {}
        self.mapping: dict[str, dict[str, str]] = {}

    def take(self, model_name: str, model: onnx.ModelProto) -> None:
        names = self.mapping.setdefault(model_name, {})
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.nbytes <= INLINE_BYTES:
                continue
            arr = np.ascontiguousarray(arr)
            digest = hashlib.sha256(arr.tobytes()).hexdigest() + str(arr.dtype) + str(arr.shape)
            key = self._by_digest.get(digest)
            if key is None:
                key = self._by_digest[digest] = f"w{len(self.arrays)}"
                self.arrays[key] = arr
            names[init.name] = key
            init.ClearField("raw_data")
            for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                init.ClearField(f)

    def write(self, models: dict[str, onnx.ModelProto], out_dir: Path) -> None:
        """Save weights.safetensors and point each model's initializers at their byte ranges."""
        from safetensors.numpy import save_file

        path = out_dir / WEIGHTS_FILE
        save_file(self.arrays, str(path))
        header = read_header(path)
        base = data_start(path)
        for model_name, model in models.items():
            names = self.mapping[model_name]
            for init in model.graph.initializer:
                key = names.get(init.name)
                if key is None:
                    continue
                begin, end = header[key]["data_offsets"]
                del init.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(base + begin)), ("length", str(end - begin))):
                    entry = init.external_data.add()
                    entry.key, entry.value = k, v
                init.data_location = onnx.TensorProto.EXTERNAL


def lower(traced: list[Traced], out_dir: str | os.PathLike, ctx: PassContext) -> dict:
    out_dir = Path(out_dir)
    level = ctx.quant.accuracy_level
    store = _WeightStore()
    models = {}
    for t in traced:
        models[t.name] = export_onnx(t, level)
        store.take(t.name, models[t.name])
    store.write(models, out_dir)
    files = {}
    for name, model in models.items():
        fname = f"{name}.onnx"
        onnx.save_model(model, str(out_dir / fname))
        files[name] = fname
    return {
        "kind": "onnxruntime",
        "graphs": files,
        "weights": WEIGHTS_FILE,
        "initializers": store.mapping,
        "io": {t.name: {"inputs": t.input_names, "outputs": t.output_names} for t in traced},
        "op_histogram": {name: _onnx_histogram(m) for name, m in models.items()},
    }


def _onnx_histogram(model: onnx.ModelProto) -> dict[str, int]:
    hist: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: -kv[1]))
