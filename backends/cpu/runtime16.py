"""A cpu step graph with glmc kernels' linears: onnxruntime between them, TVM kernels for them.

The step graph of a `--dtype bf16|fp16` cpu artifact (backends/cpu/lean.py) holds every
linear as a glmc Linear16 node over a 16-bit weight in backends/cpu/linear16.py's block
layout; an `--int4-matmul glmc` (`--int8-matmul glmc`) one holds its int4 (int8) linears as
glmc Linear4 (Linear8) nodes over codes and scales in backends/cpu/linearq.py's layout.
Nothing in onnxruntime runs such a node, so `SplitStep` cuts the graph there: the
nodes between two linears (norms, attention with its in-place KV cache, activations)
make one onnxruntime session each, and the linears run as TVM kernels on the mapped
weights. To the executor it looks like one onnxruntime session: `io_binding()` and
`run_with_iobinding(binding)`, the KV buffers bound as past and present at once.

Per piece and linear, a call costs a binding and a copy of the linear's input rows (the
kernels read 64-byte-aligned rows; onnxruntime hands out its own buffers).

A planned decode call (one token per row, the cache bound as past and present) also runs
the pieces that are exactly an attention (with its bias Add), a residual add + RMS norm or a
SwiGLU on glmc's kernels (backends/cpu/attention.py, rowwise.py): each such piece's `kernel`
plans the call, or declines and the piece's session runs it (verification). An unplanned
call (a prompt) runs them as kernels too: its norms and SwiGLUs (`_run_rowwise`), and its
attention as the prompt kernel (`_run_attention`: all of a row's new tokens at once, causal),
each output in a buffer with the padding rows of the linears that read it, which they read in
place.
"""

from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from glmc.backends.cpu import attention, linear16, linearq, rowwise
from glmc.backends.cpu.lean import GLMC
from glmc.backends.cpu.linear16 import ALIGN, aligned_empty
from glmc.settings import cpu_decode_kernels


LINEAR, PIECES = "glmc.cpu linears (TVM)", "onnxruntime pieces"      # profile_decode's kinds
ATTENTION = "glmc.cpu attention (TVM)"
ROWWISE = "glmc.cpu norms and activations (TVM)"
TRIM_ROWS = 512     # a call with more rows than this (a long prompt) gives its freed memory back after it
KERNELS = frozenset({"Linear16", "Linear4", "Linear8"})     # the node types glmc's linear kernels run


@dataclass(eq=False)
class _Attention:
    """A GroupQueryAttention node (packed QKV, interleaved rotary, fp32 cache) and the bias
    Add before it, if any: glmc's decode kernel runs it for one token per row."""
    qkv: str                # the packed projection (before the bias)
    bias: np.ndarray | None
    past: tuple             # (past_key, past_value)
    present: tuple          # (present_key, present_value)
    seqlens: str
    cos: np.ndarray
    sin: np.ndarray
    out: str
    kernel: object          # attention.Attention
    kind = ATTENTION

    def cache(self, binding: _Binding, given: dict) -> tuple | None:
        """The KV cache as (k, v) arrays where it is bound as past and present at once
        (aligned, fp32) and seqlens is int32, else None (onnxruntime runs the piece)."""
        past = [binding.inputs.get(x) for x in self.past]
        present = [given.get(x) for x in self.present]
        seqlens = binding.inputs.get(self.seqlens)
        if None in past or None in present or seqlens is None \
                or any(p.data_ptr() != q.data_ptr() or p.data_ptr() % ALIGN for p, q in zip(past, present)) \
                or _dtype(past[0]) != np.float32 or _dtype(seqlens) != np.int32:
            return None
        return tuple(_view(p, tuple(p.shape())) for p in past)

    def slots(self, binding: _Binding, B: int) -> np.ndarray:
        """A view of the call's seqlens (B,): each row's last slot."""
        return np.frombuffer((ctypes.c_int32 * B).from_address(binding.inputs[self.seqlens].data_ptr()), np.int32, B)

    def plan(self, binding: _Binding, shapes: dict, given: dict, buffer):
        """The kernel's call for a planned run of one token per row whose cache is bound as
        past and present at once (the executor's decode step), or None (onnxruntime runs it)."""
        shape = shapes.get(self.qkv, ((),))[0]
        cache = self.cache(binding, given)
        if len(shape) != 3 or shape[1] != 1 or cache is None:
            return None
        B = shape[0]
        k, v = cache
        seq = aligned_empty((B,), np.int32)
        run = self.kernel.bound(buffer(self.qkv)[:B], self.bias, k, v, seq, self.cos, self.sin, buffer(self.out)[:B])

        def call(slots=self.slots(binding, B), seq=seq, run=run):
            seq[:] = slots
            run()
        return call


def _rows(shapes: dict, names) -> int | None:
    """The rows of values `names` (all made by earlier steps, fp32, the same leading shape)
    when a row-wise kernel takes them, else None."""
    if any(x not in shapes or shapes[x][1] != np.float32 for x in names):
        return None
    M = {math.prod(shapes[x][0][:-1]) for x in names}
    return next(iter(M)) if len(M) == 1 else None


@dataclass(eq=False)
class _SkipNorm:
    """A SkipSimplifiedLayerNormalization piece (no bias): y = norm(x + skip) * gamma, s = x + skip."""
    x: str
    skip: str
    gamma: np.ndarray
    eps: float
    y: str
    s: str | None           # None: no later step reads the sum
    kernels: object = None  # rowwise.RowKernels
    kind = ROWWISE

    def made(self, shapes: dict) -> dict:
        """The shapes of what it makes from its inputs' `shapes`."""
        return {y: shapes[self.x] for y in (self.y, self.s) if y}

    def plan(self, binding: _Binding, shapes: dict, given: dict, buffer):
        M = _rows(shapes, [self.x, self.skip, self.y] + ([self.s] if self.s else []))
        if M is None or self.y in given or self.s in given:
            return None
        s = buffer(self.s)[:M] if self.s else aligned_empty((M, self.gamma.shape[0]), np.float32)
        return self.kernels.skip_norm(buffer(self.x)[:M], buffer(self.skip)[:M], self.gamma, buffer(self.y)[:M], s,
                                      self.eps)


@dataclass(eq=False)
class _SwiGLU:
    """A Split / Sigmoid / Mul / Mul piece: y = a * sigmoid(a) * b of x's halves a, b."""
    x: str
    y: str
    width: int              # of y (x has twice as many columns)
    kernels: object = None
    kind = ROWWISE

    def made(self, shapes: dict) -> dict:
        shape, dtype = shapes[self.x]
        return {self.y: ((*shape[:-1], self.width), dtype)}

    def plan(self, binding: _Binding, shapes: dict, given: dict, buffer):
        M = _rows(shapes, [self.x, self.y])
        if M is None or self.y in given:
            return None
        return self.kernels.swiglu(buffer(self.x)[:M], buffer(self.y)[:M])


@dataclass(eq=False)
class _Piece:
    nodes: list
    inputs: list            # read from the graph's inputs or earlier pieces
    outputs: list           # needed by later pieces or the graph's outputs
    initializers: list
    session: object = None
    kernel: object = None   # _Attention, _SkipNorm or _SwiGLU: a decode step runs it as glmc's kernel instead


@dataclass(eq=False)
class _Linear:
    x: str
    y: str
    weights: list           # the node's weight inputs (Linear16: the weight; Linear4 / 8: codes, scales)
    K: int
    N: int
    kind: str               # the node type
    block: int | None       # Linear4 / Linear8: the inputs per activation scale
    w: object = None        # the weight as its kernels' view
    kernels: object = None  # the Kernels that run it

    def padded_rows(self, M: int) -> int:
        return self.kernels.padded_rows(M)


class _Binding:
    """What onnxruntime's IOBinding offers the executor, for a SplitStep. A binding run again
    with nothing rebound (a decode step's) runs its `plan`: buffers and bindings made once."""

    def __init__(self):
        self.inputs: dict[str, ort.OrtValue] = {}
        self.outputs: dict[str, ort.OrtValue | None] = {}
        self._keep: list = []
        self.results: list = []
        self.held: list = []        # the last run's piece bindings: they own what the results point at
        self.plan = None
        self.shapes: dict | None = None     # of every value the last run passed between steps

    def _changed(self) -> None:
        self.plan = self.shapes = None

    def bind_cpu_input(self, name: str, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value)
        self._keep.append(value)
        self.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))

    def bind_ortvalue_input(self, name: str, value: ort.OrtValue) -> None:
        self.inputs[name] = value
        self._changed()

    def bind_output(self, name: str) -> None:
        self.outputs[name] = None
        self._changed()

    def bind_ortvalue_output(self, name: str, value: ort.OrtValue) -> None:
        self.outputs[name] = value
        self._changed()

    def get_outputs(self) -> list:
        return self.results


class SplitStep:
    """The step graph at `source` (a path, or a part of it as a ModelProto: verification's
    layers) as onnxruntime pieces and TVM linears, run in order.

    make_session(model_bytes, initializer names) -> an onnxruntime session over the
    artifact's mapped weights; weights: initializer name -> its mapped array; dtype: the
    16-bit linears' (None without them); place(names) -> {name: array}: where the linears'
    weights are read from (the executor's copies on 2 MB pages), else the mapped arrays."""

    def __init__(self, source: Path | onnx.ModelProto, make_session, weights: dict, dtype: str | None, threads: int,
                 place=None):
        model = onnx.load(str(source), load_external_data=False) if isinstance(source, Path) else source
        graph = model.graph
        self._opsets = [o for o in model.opset_import if o.domain != GLMC]
        self._ir_version = model.ir_version
        self._value_info = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
        inits = {t.name: t for t in graph.initializer}
        self.steps: list = []
        run: list = []
        readers: dict[str, int] = {}
        for node in graph.node:
            for x in node.input:
                readers[x] = readers.get(x, 0) + 1
        attention_kernels: dict = {}
        decode_kernels = cpu_decode_kernels()
        for node in graph.node:
            spec = self._attention(node, run, inits, weights, readers, attention_kernels, threads) \
                if decode_kernels else None
            if spec is not None:
                nodes = [node]
                if spec.bias is not None:
                    nodes.insert(0, run.pop())
                if run:
                    self.steps.append(_Piece(run, [], [], []))
                    run = []
                self.steps.append(_Piece(nodes, [], [], [], kernel=spec))
            elif node.domain == GLMC and node.op_type in KERNELS:
                if run:
                    self.steps.append(_Piece(run, [], [], []))
                    run = []
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                self.steps.append(_Linear(node.input[0], node.output[0], list(node.input[1:]), int(attrs["k"]),
                                          int(attrs["n"]), node.op_type, attrs.get("block")))
            else:
                run.append(node)
        if run:
            self.steps.append(_Piece(run, [], [], []))
        graph_outputs = {v.name for v in graph.output}
        read_at: dict[str, int] = {}            # value -> the last step that reads it
        self._last_read = read_at
        for i, step in enumerate(self.steps):
            for x in (step.x,) if isinstance(step, _Linear) else (x for n in step.nodes for x in n.input):
                if x:
                    read_at[x] = i
        for i, step in enumerate(self.steps):
            if isinstance(step, _Linear):
                continue
            made = {out for n in step.nodes for out in n.output if out}
            read = list(dict.fromkeys(x for n in step.nodes for x in n.input if x and x not in made))
            step.inputs = [x for x in read if x not in inits]
            step.initializers = [x for x in read if x in inits]
            step.outputs = [x for x in sorted(made) if x in graph_outputs or read_at.get(x, -1) > i]
            sub = helper.make_graph(step.nodes, f"piece_{i}", [self._info(x) for x in step.inputs],
                                    [self._info(x) for x in step.outputs],
                                    initializer=[inits[x] for x in step.initializers])
            proto = helper.make_model(sub, opset_imports=self._opsets, ir_version=self._ir_version)
            step.session = make_session(proto.SerializeToString(), step.initializers)
            if step.kernel is None and decode_kernels:
                step.kernel = self._row_kernel(step, inits, weights)
        rows = [s.kernel for s in self.steps if isinstance(s, _Piece) and isinstance(s.kernel, (_SkipNorm, _SwiGLU))]
        if rows:
            row_kernels = rowwise.RowKernels([(k.gamma.shape[0], k.eps) for k in rows if isinstance(k, _SkipNorm)],
                                             [k.width for k in rows if isinstance(k, _SwiGLU)], threads)
            for k in rows:
                k.kernels = row_kernels
        linears = [s for s in self.steps if isinstance(s, _Linear)]
        kernels = {}
        if any(s.kind == "Linear16" for s in linears):
            kernels["Linear16"] = linear16.Kernels([(s.K, s.N) for s in linears if s.kind == "Linear16"], dtype, threads)
        quantized = [s for s in linears if s.kind in ("Linear4", "Linear8")]
        if quantized:
            kernels["Linear4"] = kernels["Linear8"] = linearq.Kernels(
                [(s.K, s.N, s.block, 4 if s.kind == "Linear4" else 8) for s in quantized], threads)
        self._kept = []
        placed = place([name for s in linears for name in s.weights]) if place is not None else weights
        for s in linears:
            arrays = []
            for name in s.weights:
                w = _aligned(placed[name])      # a copy of an entry the file could not place aligned
                if w is not placed[name]:
                    self._kept.append(w)
                arrays.append(w)
            s.kernels = kernels[s.kind]
            s.w = s.kernels.tensor(arrays[0] if s.kind == "Linear16" else tuple(arrays))
        self._linear_readers: dict[str, list] = {}
        for s in linears:
            self._linear_readers.setdefault(s.x, []).append(s)
        self._scratch: dict[int, np.ndarray] = {}
        self.timings: dict[str, float] | None = None     # set to {} to profile: seconds by kind of step

    def _attention(self, node, run: list, inits: dict, weights: dict, readers: dict, kernels: dict,
                   threads: int) -> _Attention | None:
        """`node` as an _Attention when it is attention glmc's kernel computes the same way
        (with the bias Add that ends `run`, if it feeds only this node), else None."""
        if node.domain != "com.microsoft" or node.op_type != "GroupQueryAttention":
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = list(node.input) + [""] * (9 - len(node.input))
        if ins[1] or ins[2] or attrs.get("do_rotary") != 1 or attrs.get("rotary_interleaved") != 1 \
                or set(attrs) - {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved"} \
                or len(node.input) != 9 or ins[7] not in inits or ins[8] not in inits:
            return None
        past = self._value_info.get(ins[3])
        dims = [d.dim_value for d in past.type.tensor_type.shape.dim] if past is not None else []
        if past is None or past.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or not dims[3]:
            return None
        H, Hkv, D = int(attrs["num_heads"]), int(attrs["kv_num_heads"]), dims[3]
        cos, sin = (_aligned(_array(ins[i], inits, weights)) for i in (7, 8))
        scale = float(attrs.get("scale", 0.0)) or D ** -0.5
        if attention.supported(H, Hkv, D, cos.shape[1]) or cos.shape != sin.shape:
            return None
        qkv, bias = ins[0], None
        add = run[-1] if run else None
        if add is not None and add.op_type == "Add" and not add.domain and add.output[0] == qkv \
                and readers.get(qkv) == 1 and add.input[1] in inits:
            qkv, bias = add.input[0], _aligned(_array(add.input[1], inits, weights))
            if bias.shape != ((H + 2 * Hkv) * D,):
                return None
        key = (H, Hkv, D, cos.shape[1], scale)
        if key not in kernels:
            kernels[key] = attention.Attention(*key, threads)
        return _Attention(qkv, bias, (ins[3], ins[4]), (node.output[1], node.output[2]), ins[5], cos, sin,
                          node.output[0], kernels[key])

    def _row_kernel(self, piece: _Piece, inits: dict, weights: dict):
        """The piece as a _SkipNorm or _SwiGLU when it is exactly one, else None."""
        nodes = piece.nodes
        if len(nodes) == 1 and nodes[0].domain == "com.microsoft" \
                and nodes[0].op_type == "SkipSimplifiedLayerNormalization":
            n = nodes[0]
            outs = list(n.output) + [""] * (4 - len(n.output))
            eps = {a.name: helper.get_attribute_value(a) for a in n.attribute}.get("epsilon")
            if len(n.input) != 3 or n.input[2] not in inits or eps is None or outs[0] not in piece.outputs \
                    or set(piece.outputs) - {outs[0], outs[3]}:
                return None
            gamma = _aligned(_array(n.input[2], inits, weights).astype(np.float32))
            if gamma.ndim != 1 or rowwise.supported(gamma.shape[0]):
                return None
            return _SkipNorm(n.input[0], n.input[1], gamma, float(eps), outs[0],
                             outs[3] if outs[3] in piece.outputs else None)
        if [(n.domain, n.op_type) for n in nodes] != [("", "Split"), ("", "Sigmoid"), ("", "Mul"), ("", "Mul")]:
            return None
        split, sigmoid, gate, out = nodes
        attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
        if attrs.get("axis") != -1 or (len(split.input) > 1 and split.input[1]) or len(split.output) != 2:
            return None
        a, b = split.output
        if list(sigmoid.input) != [a] or sorted(gate.input) != sorted([a, sigmoid.output[0]]) \
                or sorted(out.input) != sorted([gate.output[0], b]) or piece.outputs != [out.output[0]]:
            return None
        N = next((s.N for s in self.steps if isinstance(s, _Linear) and s.y == split.input[0]), None)
        if N is None or N % 2 or rowwise.supported(N // 2):
            return None
        return _SwiGLU(split.input[0], out.output[0], N // 2)

    def _info(self, name: str) -> onnx.ValueInfoProto:
        info = self._value_info.get(name)
        if info is None or not info.type.tensor_type.elem_type:
            return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        return info

    def io_binding(self) -> _Binding:
        return _Binding()

    def run(self, output_names: list, feeds: dict) -> list:
        """onnxruntime's InferenceSession.run: arrays in, the named outputs out (verification)."""
        binding = self.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in output_names:
            binding.bind_output(name)
        self.run_with_iobinding(binding)
        return [np.array(value.numpy()) for value in binding.get_outputs()]

    def _rows(self, K: int, rows: int) -> np.ndarray:
        """An aligned (>= rows, K) input buffer, reused: a kernel's input is dead once it ran."""
        buf = self._scratch.get(K)
        if buf is None or buf.shape[0] < rows:
            buf = self._scratch[K] = aligned_empty((rows, K), np.float32)
        return buf

    def run_with_iobinding(self, binding: _Binding) -> None:
        if binding.plan is not None:
            binding.plan()
            return
        values = dict(binding.inputs)   # name -> OrtValue (a kernel's output: made when a piece reads it)
        held = binding.held = []     # the bindings of pieces that made an output of the call
        arrays = {}                  # a value a kernel made -> its array
        full = {}                    # ... -> its buffer, with the padding rows of the linears that read it
        shapes = {} if binding.shapes is None else None
        wanted = set(binding.outputs)
        rows = 0                     # the most rows a linear took: a prompt's
        for i, step in enumerate(self.steps):
            t0 = time.perf_counter()
            if isinstance(step, _Linear):
                x = arrays.get(step.x)
                x = values[step.x] if x is None else x
                given = binding.outputs.get(step.y)
                arrays[step.y], full[step.y] = self._linear(step, x, given, full.get(step.x))
                if given is not None:
                    values[step.y] = given
                rows = max(rows, math.prod(arrays[step.y].shape[:-1]))
                read, made, kind = (step.x,), (step.y,), LINEAR
            elif (made := self._run_rowwise(step, values, arrays, full, binding)) is not None:
                read, kind = step.inputs, ROWWISE
            elif (made := self._run_attention(step, values, arrays, full, binding)) is not None:
                read, kind = step.inputs, ATTENTION
            else:
                b = step.session.io_binding()
                for x in step.inputs:
                    if x not in values:
                        values[x] = ort.OrtValue.ortvalue_from_numpy(arrays[x])
                    b.bind_ortvalue_input(x, values[x])
                for y in step.outputs:
                    given = binding.outputs.get(y)
                    if given is not None:
                        b.bind_ortvalue_output(y, given)
                    else:
                        b.bind_output(y)
                step.session.run_with_iobinding(b)
                values.update(zip(step.outputs, b.get_outputs()))
                if wanted.intersection(step.outputs):
                    held.append(b)
                read, made, kind = step.inputs, step.outputs, PIECES
            if self.timings is not None:
                self.timings[kind] = self.timings.get(kind, 0.0) + time.perf_counter() - t0
            if shapes is not None:
                shapes.update((y, (arrays[y].shape, arrays[y].dtype) if y in arrays else
                               (tuple(values[y].shape()), _dtype(values[y]))) for y in made)
            for x in read:          # a value no later step reads is let go (a long prompt's are large)
                if self._last_read.get(x) == i and x not in wanted and x not in binding.inputs:
                    values.pop(x, None)
                    arrays.pop(x, None)
                    full.pop(x, None)
        # a linear's unbound output is returned as its array: numpy() of an OrtValue made from an
        # array is a view that does not keep the array alive
        binding.results = [binding.outputs[y] if binding.outputs[y] is not None else
                           _Array(arrays[y]) if y in arrays else values[y]
                           for y in binding.outputs]
        if binding.shapes is None:      # the first run: what a plan needs, made on the second
            binding.shapes = shapes
        else:
            binding.plan = self._plan(binding)
        if rows > TRIM_ROWS:
            del values, arrays, full
            release_freed_memory()

    def _plan(self, binding: _Binding):
        """The run of a binding whose inputs, outputs and shapes stay as they are: every value
        between two steps in a buffer of its own (a linear's input with its padding rows, so a
        piece writes it where the kernel reads it), each piece's binding made once, each kernel
        call's views made once."""
        shapes, given = binding.shapes, {k: v for k, v in binding.outputs.items() if v is not None}
        arrays: dict[str, np.ndarray] = {}          # value -> its buffer (rows padded for a kernel)
        ort_values: dict[str, ort.OrtValue] = dict(binding.inputs)

        def buffer(name: str, rows: int = 0) -> np.ndarray:
            """Value `name`'s buffer, made on first use with the padding rows of the linears that
            read it (and `rows`: a linear's output, the rows its kernel writes)."""
            if name not in arrays:
                shape, dtype = shapes[name]
                M = math.prod(shape[:-1])
                full = aligned_empty((max(self._padded_rows(name, M), rows), shape[-1] if shape else 1), dtype)
                arrays[name] = full
                ort_values[name] = ort.OrtValue.ortvalue_from_numpy(full[:M].reshape(shape))
            return arrays[name]

        padded = {}             # linear -> the rows its kernel computes
        for step in self.steps:
            if isinstance(step, _Linear):
                if step.x in binding.inputs or step.x in given:
                    return None         # (no such graph: a linear reads what a piece made)
                padded[step] = step.padded_rows(math.prod(shapes[step.x][0][:-1]))
        calls = []              # (kind, call): what a run calls, in order
        for step in self.steps:
            if isinstance(step, _Linear):
                M, x = math.prod(shapes[step.x][0][:-1]), arrays[step.x]
                out = given.get(step.y)
                if out is not None and padded[step] == M and out.data_ptr() % ALIGN == 0:
                    y = _view(out, (M, step.N))
                    ort_values[step.y] = out
                    calls.append((LINEAR, step.kernels.bound(x, step.w, y, M)))
                    continue
                y = buffer(step.y, padded[step])
                calls.append((LINEAR, step.kernels.bound(x, step.w, y, M)))
                if out is not None:     # a bound output the kernel cannot write itself: copied there
                    ort_values[step.y] = out
                    calls.append(("copies", lambda src=y[:M], dst=_view(out, (M, step.N)): np.copyto(dst, src)))
                continue
            if step.kernel is not None:
                call = step.kernel.plan(binding, shapes, given, buffer)
                if call is not None:
                    calls.append((step.kernel.kind, call))
                    continue
            b = step.session.io_binding()
            for x in step.inputs:
                b.bind_ortvalue_input(x, ort_values[x])
            for y in step.outputs:
                if y in given:
                    b.bind_ortvalue_output(y, given[y])
                else:
                    buffer(y)
                    b.bind_ortvalue_output(y, ort_values[y])
            calls.append((PIECES, lambda b=b, sess=step.session: sess.run_with_iobinding(b)))
        binding.results = [given[y] if y in given else _Array(arrays[y][:math.prod(shapes[y][0][:-1])]
                                                               .reshape(shapes[y][0]))
                           for y in binding.outputs]
        keep = (arrays, ort_values)
        if self.timings is not None:
            calls = [_timed(self.timings, kind, call) for kind, call in calls]
        else:
            calls = [call for _, call in calls]

        def run(calls=calls, keep=keep):
            for call in calls:
                call()
        return run

    def _linear(self, step: _Linear, x, given: ort.OrtValue | None, x_full: np.ndarray | None):
        """y = x W^T for x an array (a kernel made it) or an OrtValue -> (y's array: in `given`
        where bound; its buffer with the padding rows, None where bound). x_full: x's buffer
        with padding rows, where a kernel made x; else the kernel reads x in place where it is
        fp32, aligned and needs no padding rows, or a copy."""
        if isinstance(x, np.ndarray):
            shape, fp32, at = x.shape, x.dtype == np.float32, x.ctypes.data
        else:
            shape, fp32, at = tuple(x.shape()), _dtype(x) == np.float32, x.data_ptr()
        M = math.prod(shape[:-1])
        padded = step.padded_rows(M)
        if x_full is not None and x_full.shape[0] >= padded:
            xs = x_full
        elif padded == M and fp32 and at % ALIGN == 0 and (not isinstance(x, np.ndarray) or x.flags.c_contiguous):
            xs = x.reshape(M, step.K) if isinstance(x, np.ndarray) else _view(x, (M, step.K))
        else:
            xs = self._rows(step.K, padded)
            xs[:M] = x.reshape(M, step.K) if isinstance(x, np.ndarray) else _view(x, (M, step.K)) if fp32 else \
                x.numpy().reshape(M, step.K)
        if given is not None and padded == M and given.data_ptr() % ALIGN == 0:
            y = _view(given, (M, step.N))       # a bound output (the logits): written in place
            step.kernels.linear(xs, step.w, y, M)
            return y.reshape(*shape[:-1], step.N), None
        y_full = aligned_empty((padded, step.N), np.float32)
        step.kernels.linear(xs, step.w, y_full, M)
        y = y_full[:M].reshape(*shape[:-1], step.N)
        if given is not None:
            _view(given, y.shape)[...] = y
            return y, None
        return y, y_full

    def _run_rowwise(self, step, values: dict, arrays: dict, full: dict, binding: _Binding) -> list | None:
        """A norm or SwiGLU piece of an unplanned call (a prompt's) run as glmc's kernel: the
        names it made (their arrays in `arrays` and `full`), or None where its session runs
        it (no such kernel, an output bound, not fp32)."""
        kernel = step.kernel
        if not isinstance(kernel, (_SkipNorm, _SwiGLU)) or any(y in binding.outputs for y in step.outputs):
            return None
        shapes = {x: (arrays[x].shape, arrays[x].dtype) if x in arrays else (tuple(values[x].shape()), _dtype(values[x]))
                  for x in step.inputs}
        made = kernel.made(shapes)
        shapes |= made
        if _rows(shapes, list(shapes)) is None:
            return None

        def buffer(name: str) -> np.ndarray:
            shape = shapes[name][0]
            M = math.prod(shape[:-1])
            if name not in full:
                full[name] = aligned_empty((self._padded_rows(name, M), shape[-1]), np.float32) if name in made \
                    else _aligned(arrays[name].reshape(M, shape[-1]) if name in arrays
                                  else _view(values[name], (M, shape[-1])))
            return full[name]

        kernel.plan(binding, shapes, {}, buffer)()
        for y, (shape, _) in made.items():
            arrays[y] = full[y][:math.prod(shape[:-1])].reshape(shape)
        return list(made)

    def _run_attention(self, step, values: dict, arrays: dict, full: dict, binding: _Binding) -> list | None:
        """An attention piece of an unplanned call (a prompt's tokens) run as glmc's prompt
        kernel: the names it made (the output in `arrays` and `full`; the cache, written in
        place, as the bound presents), or None where its session runs it (no such kernel, the
        cache not bound in place, the packed projection not a kernel's fp32 output)."""
        spec = step.kernel
        if not isinstance(spec, _Attention):
            return None
        qkv, cache = arrays.get(spec.qkv), spec.cache(binding, binding.outputs)
        if cache is None or qkv is None or qkv.ndim != 3 or qkv.dtype != np.float32 or not qkv.flags.c_contiguous \
                or qkv.ctypes.data % ALIGN or qkv.shape[0] != cache[0].shape[0]:
            return None
        B, C = qkv.shape[:2]
        seq = aligned_empty((B,), np.int32)
        seq[:] = spec.slots(binding, B)
        width = spec.kernel.H * spec.kernel.D
        out = full[spec.out] = aligned_empty((self._padded_rows(spec.out, B * C), width), np.float32)
        arrays[spec.out] = out[:B * C].reshape(B, C, width)
        spec.kernel.prompt(qkv, spec.bias, *cache, seq, spec.cos, spec.sin, arrays[spec.out])
        for name in spec.present:
            values[name] = binding.outputs[name]
        return [spec.out, *spec.present]

    def _padded_rows(self, name: str, M: int) -> int:
        """The rows a buffer of value `name` needs: M, or more for the linears that read it."""
        return max([M] + [s.padded_rows(M) for s in self._linear_readers.get(name, ())])


_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _dtype(value: ort.OrtValue):
    return np.dtype(_DTYPES[value.data_type()])


def _timed(timings: dict, kind: str, call):
    def run():
        t0 = time.perf_counter()
        call()
        timings[kind] = timings.get(kind, 0.0) + time.perf_counter() - t0
    return run


class _Array:
    """An output the way the executor reads one (`.numpy()`), over an array of its own."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def numpy(self) -> np.ndarray:
        return self.array


def release_freed_memory() -> None:
    """Hand the heap memory freed since back to the system (glibc's malloc_trim). A prompt's
    activations are freed when the call ends, but glibc keeps much of them: the pieces run
    without onnxruntime's arena and glibc raises its mmap threshold after each large free, so
    later buffers come from a heap it does not shrink. small-glm int4 on glmc's kernels held
    1265 MB after a 2000-token prompt, 624 MB after trimming (its MatMulNBits build: ~700)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _libc():
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _array(name: str, inits: dict, weights: dict) -> np.ndarray:
    """Initializer `name`: its mapped array (external data), or the graph's own copy."""
    if name in weights:
        return weights[name]
    return numpy_helper.to_array(inits[name])


def _aligned(a: np.ndarray) -> np.ndarray:
    """`a`, or an ALIGN-aligned copy of it (also of a read-only `a`: DLPack exports no such array)."""
    if a.ctypes.data % ALIGN == 0 and a.flags.c_contiguous and a.flags.writeable:
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def _view(value: ort.OrtValue, shape) -> np.ndarray:
    """A numpy view of an fp32 OrtValue's memory (onnxruntime's numpy() copies)."""
    n = math.prod(shape)
    buf = (ctypes.c_float * n).from_address(value.data_ptr())
    return np.frombuffer(buf, np.float32, n).reshape(shape)
