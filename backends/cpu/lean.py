"""The cpu generation entry ("step") built straight from glmc's fused extend graph.

torch.onnx turns the fused graph into ~470 nodes for small-glm: shape arithmetic, masks
built from inputs every call, the cache sliced and concatenated per layer. This lowering
walks the fused FX graph itself and emits only what onnxruntime has to compute, one
node (or a few) per glmc op:

  embedding / embedding_int8  -> Gather (+ Cast, Mul by the row scales)
  rms_norm / add_rms_norm     -> RMSNormalization / com.microsoft.SkipSimplifiedLayerNormalization
  linear_nbits / linear       -> com.microsoft.MatMulNBits / MatMul (+ Add bias, none for an
                                 all-zero bias)
  swiglu / geglu              -> Split + Sigmoid / Gelu + Mul; where the packed [gate | up]
                                 input is an fp32 MatMul, two MatMuls over its halves instead
                                 of one and a Split (`_glu_halves`)
  the attention block         -> one com.microsoft.GroupQueryAttention: the packed QKV
      (split -> view -> transpose -> rotary -> attention -> transpose -> reshape)
      projection in, rotary inside (interleaved, GLM's partial rotary), the KV cache as
      a (B, Hkv, S, D) buffer shared in place by past_* and present_*
  last-token gather           -> Gather of the flattened (B*C) rows `last_rows`: one per
                                 sequence when generating, so the final matmul runs on B
                                 rows, not B x C; all B*C when scoring (every position's
                                 logits, so no separate score entry is needed)

  step(input_ids (B, C) i64, seqlens_k (B,) i32, total_sequence_length () i32,
       last_rows (R,) i64, past_key_0, past_value_0, ...  each (B, Hkv, S, D))
    -> logits (R, 1, V), present_key_0, present_value_0, ...  (the same buffers, written)

seqlens_k[b] is the slot of row b's last token after the call (GQA's convention), so a
row's tokens sit at slots 0.. and its positions equal its slots. The mask and position
inputs of the traced graph are not needed: GQA is causal over each row's first
seqlens_k + 1 slots. A graph holding anything else, or attention this op cannot take
(the rotary width must be a multiple of 16; an fp16 cache), is declined: `build_step`
returns None with the reason, and the artifact keeps the exported extend entry.

Run-time adapter slots (--lora-slots N --lora-rank R): every decoder linear y = x W^T
also gets y += (x @ A) @ B, where A (R, K, W) and B (R, W, N_out) are graph inputs the
runtime binds: R = 1 (one adapter for the whole batch, a view of its slot) or R = batch
(row b's adapter in row b). W is parts x rank, one rank block per checkpoint tensor
packed into the linear (B is block-diagonal). With no adapter in a batch the runtime binds
W = 0 tables: three nodes per linear that do no arithmetic (no Gather: measured on
small-glm int4, a slot Gather per table cost another 3-4% of a decode step).
`lora_linears` records, per linear, which checkpoint tensors' rows it holds, so an
adapter can be laid out for it at run time.
"""

from __future__ import annotations

import operator
import sys

import numpy as np
import onnx_ir as ir
import torch
from torch.onnx._internal.exporter._core import TorchTensor

import glmc.ops  # noqa: F401  (registers the glmc:: ops the handlers are keyed by)
from glmc.backends.cpu.ops import MS, OPSET
from glmc.modelcfg import head_dim
from glmc.trace import Traced
from glmc.weights import Blocks, Cast, Cat, Part, Rows, Source, Transpose

FLOAT, INT64, INT32 = ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.INT32
_aten = torch.ops.aten
_glmc = torch.ops.glmc
GLMC = "glmc.cpu"               # the domain of nodes the runtime runs itself (Linear16, Linear4)


class Declined(Exception):
    """The fused graph holds something this lowering does not emit."""


class _Builder:
    def __init__(self, traced: Traced, book, config: dict, accuracy_level: int, lora_slots=None,
                 int8_dynamic: bool = False, linear16: str | None = None, linear4: bool = False,
                 linear8: bool = False):
        self.gm, self.book, self.config = traced.gm, book, config
        self.linear16 = linear16                # "bf16" / "fp16": linears as glmc Linear16 nodes
        self.linear4 = linear4                  # symmetric int4 linears as glmc Linear4 nodes
        self.linear8 = linear8                  # int8 linears as glmc Linear8 nodes
        self.accuracy_level = accuracy_level
        self.lora_slots = lora_slots            # (slots, rank) or None
        self.lora_linears: list[dict] = []
        self.nodes: list[ir.Node] = []
        self.inits: dict[str, ir.Value] = {}
        self.values: dict = {}                  # fx node -> ir.Value (or tuple of them)
        self.presents: dict[int, tuple] = {}    # layer -> (present_key, present_value)
        self.last_token = False                 # the lm_head runs on each row's last token only
        self.int8_dynamic = int8_dynamic        # int8 decoder linears as DynamicQuantizeMatMul
        self.lm_head = None                     # the fx node giving the logits (it keeps MatMulNBits)
        past = [n for n in self.gm.graph.nodes if n.op == "placeholder"][4:]
        self.past_index = {n: i for i, n in enumerate(past)}
        self.L = len(past) // 2
        B, C = ir.SymbolicDim("batch"), ir.SymbolicDim("chunk")
        self.inputs = {
            "input_ids": self._input("input_ids", INT64, [B, C]),
            "seqlens_k": self._input("seqlens_k", INT32, [B]),
            "total_sequence_length": self._input("total_sequence_length", INT32, []),
            "last_rows": self._input("last_rows", INT64, [ir.SymbolicDim("rows")]),
        }
        self.lora_inputs: list[ir.Value] = []
        S = ir.SymbolicDim("capacity")
        Hkv, D = config["num_key_value_heads"], head_dim(config)
        self.past = [self._input(f"past_{kind}_{i}", FLOAT, [B, Hkv, S, D])
                     for i in range(self.L) for kind in ("key", "value")]

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _input(name, dtype, dims):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))

    def op(self, op_type, inputs, attrs=None, domain="", outputs=1, dtype=FLOAT):
        node = ir.node(op_type, inputs, attrs or {}, domain=domain, num_outputs=outputs)
        for out in node.outputs:
            out.type = ir.TensorType(dtype)
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def _const(self, name: str, value: np.ndarray, dtype) -> ir.Value:
        """A small constant initializer, one per name."""
        name = name.replace("-", "m")
        if name not in self.inits:
            self.inits[name] = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(value.shape)),
                                        const_value=ir.tensor(value, name=name))
        return self.inits[name]

    def const_ints(self, *values):
        return self._const("ints_" + "_".join(map(str, values)), np.array(values, np.int64), INT64)

    def const_i32(self, value: int):
        return self._const(f"i32_{value}", np.array(value, np.int32), INT32)

    def tensor(self, fx_node) -> torch.Tensor:
        return operator.attrgetter(fx_node.target)(self.gm)

    def weight(self, fx_node, transpose: bool = False) -> ir.Value:
        """An initializer for a get_attr node: the traced tensor (a recipe placeholder for
        lazily written weights), or the recipe of its transpose."""
        if fx_node.op != "get_attr":
            raise Declined(f"a weight computed in the graph ({fx_node.name})")
        t = self.tensor(fx_node)
        name = fx_node.target.replace(".", "_") + ("_t" if transpose else "")
        if name in self.inits:
            return self.inits[name]
        if transpose:
            t = self.book.value(Transpose(self.book.recipe(t)))
        tensor = TorchTensor(t, name=name)
        value = ir.Value(name=name, shape=ir.Shape(list(t.shape)), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.inits[name] = value
        return value

    def derived(self, fx_node, suffix: str, make) -> ir.Value:
        """An initializer for the recipe make(recipe of get_attr node fx_node), one per node and
        suffix: a weight in a glmc kernel's layout."""
        if fx_node.op != "get_attr":
            raise Declined(f"a weight computed in the graph ({fx_node.name})")
        name = fx_node.target.replace(".", "_") + f"_{suffix}"
        if name not in self.inits:
            t = self.book.value(make(self.book.recipe(self.tensor(fx_node))))
            tensor = TorchTensor(t, name=name)
            self.inits[name] = ir.Value(name=name, shape=ir.Shape(list(t.shape)), type=ir.TensorType(tensor.dtype),
                                        const_value=tensor)
        return self.inits[name]

    # -------------------------------------------------------------- emission
    def emit(self, n):
        """The ir.Value(s) of fx node n, emitting what it needs first (only what is used)."""
        if n in self.values:
            return self.values[n]
        handler = _HANDLERS.get(n.target) if n.op == "call_function" else None
        if n.op == "get_attr":
            out = self.weight(n)
        elif handler is None:
            raise Declined(f"{n.op} {n.target}")
        else:
            out = handler(self, n)
        self.values[n] = out
        return out

    def build(self) -> ir.Model:
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        logits_node = output.args[0][0]
        self.lm_head = logits_node
        logits = self.emit(logits_node)
        if not self.last_token:
            raise Declined("logits for every position (the last_token_logits pass did not run)")
        if len(self.presents) != self.L:
            raise Declined(f"{len(self.presents)} attention blocks for {self.L} layers")
        logits.name = "logits"
        outputs = [logits]
        for i in range(self.L):
            k, v = self.presents[i]
            k.name, v.name = f"present_key_{i}", f"present_value_{i}"
            outputs += [k, v]
        graph = ir.Graph([*self.inputs.values(), *self.lora_inputs, *self.past], outputs, nodes=self.nodes,
                         initializers=list(self.inits.values()), name="step",
                         opset_imports={"": OPSET, MS: 1, **({GLMC: 1} if self.linear16 or self.linear4 or self.linear8 else {})})
        return ir.Model(graph, ir_version=10)


# ------------------------------------------------------------------ per-op handlers
def _embedding(b: _Builder, n):
    weight, ids = n.args[0], n.args[1]
    return b.op("Gather", [b.weight(weight), b.inputs["input_ids"] if _is_ids(ids) else b.emit(ids)])


def _embedding_int8(b: _Builder, n):
    ids, qweight, scales = n.args
    ids = b.inputs["input_ids"] if _is_ids(ids) else b.emit(ids)
    rows = b.op("Cast", [b.op("Gather", [b.weight(qweight), ids], dtype=ir.DataType.INT8)], {"to": FLOAT})
    return b.op("Mul", [rows, b.op("Unsqueeze", [b.op("Gather", [b.weight(scales), ids]), b.const_ints(-1)])])


def _rms_norm(b: _Builder, n):
    x, w, eps = n.args
    return b.op("RMSNormalization", [b.emit(x), b.weight(w)], {"axis": -1, "epsilon": float(eps)})


def _add_rms_norm(b: _Builder, n):
    x, r, w, eps = n.args
    y, _mean, _inv, h = b.op("SkipSimplifiedLayerNormalization", [b.emit(x), b.emit(r), b.weight(w)],
                             {"epsilon": float(eps)}, domain=MS, outputs=4)
    return (y, h)


def _getitem(b: _Builder, n):
    return b.emit(n.args[0])[n.args[1]]


def _linear_nbits(b: _Builder, n):
    x, qweight, scales, zeros, bias, K, bits, block = n.args
    bias = _bias(b, bias)
    N = b.tensor(qweight).shape[0]
    if bits == 8 and b.int8_dynamic and n is not b.lm_head:
        y = _int8_dynamic(b, b.emit(x), qweight, scales, bias, int(K), int(N))
        return _with_adapters(b, x, qweight, y, int(K), int(N))
    if (bits == 4 and b.linear4 and zeros is None) or (bits == 8 and b.linear8):
        y = _linearq(b, b.emit(x), qweight, scales, int(K), int(N), int(block), int(bits))
        if y is not None:
            return b.op("Add", [y, b.weight(bias)]) if bias is not None else y

    def flat(v):        # (N, K / block) -> (N * K / block,), as MatMulNBits takes them
        if v is None:
            return None
        w = b.weight(v)
        return b.op("Reshape", [w, b.const_ints(-1)], dtype=w.dtype)

    y = b.op("MatMulNBits", [b.emit(x), b.weight(qweight), flat(scales), flat(zeros), None,
                             b.weight(bias) if bias is not None else None],
             {"K": int(K), "N": int(N), "bits": int(bits), "block_size": int(block),
              "accuracy_level": b.accuracy_level}, domain=MS)
    return _with_adapters(b, x, qweight, y, int(K), int(N))


def _linearq(b: _Builder, x, qweight, scales, K: int, N: int, block: int, bits: int):
    """y = x W^T as a glmc Linear4 / Linear8 node over int4 (symmetric) / int8 W in linearq's
    layout (codes and blocked scales): run by TVM kernels between onnxruntime pieces
    (backends/cpu/runtime16.py). None for a shape the kernels do not take (it stays MatMulNBits)."""
    from glmc.backends.cpu.linearq import Codes, block_width, supported, x_group

    group = block if bits == 4 else x_group(K)
    if group is None or supported(K, N, group, bits):
        return None
    width = block_width(N)
    codes = b.derived(qweight, f"q{bits}", lambda r: Codes(r, width, K, bits))
    blocked = b.derived(scales, f"q{bits}", lambda r: Blocks(r, width))
    return b.op(f"Linear{bits}", [x, codes, blocked], {"n": N, "k": K, "block": group}, domain=GLMC)


def _int8_dynamic(b: _Builder, x, qweight, scales, bias, K: int, N: int):
    """y = x W^T through com.microsoft.DynamicQuantizeMatMul: x quantized per call (uint8, one
    scale), W as (K, N) int8 with a scale per output column. glmc's int8 codes are per column
    already (quantize_weights: the scale repeats over MatMulNBits' blocks), stored as code + 128
    in MatMulNBits' (N, blocks, block) layout; the nodes turning them into (K, N) int8 read
    initializers only, so onnxruntime folds them once when the session is built and the
    artifact keeps one copy of the weights whichever kernel runs them."""
    UINT8, INT8 = ir.DataType.UINT8, ir.DataType.INT8
    _, blocks, block = b.tensor(qweight).shape
    q = b.op("Reshape", [b.weight(qweight), b.const_ints(N, -1)], dtype=UINT8)
    if blocks * block != K:         # padded to whole blocks
        q = b.op("Slice", [q, b.const_ints(0), b.const_ints(K), b.const_ints(1)], dtype=UINT8)
    q = b.op("Cast", [q], {"to": INT32}, dtype=INT32)
    q = b.op("Sub", [q, b.const_i32(128)], dtype=INT32)
    q = b.op("Cast", [q], {"to": INT8}, dtype=INT8)
    w = b.op("Transpose", [q], {"perm": [1, 0]}, dtype=INT8)
    scale = b.op("Reshape", [b.op("Gather", [b.weight(scales), b.const_ints(0)], {"axis": 1}), b.const_ints(-1)])
    inputs = [x, w, scale] + ([None, b.weight(bias)] if bias is not None else [])
    return b.op("DynamicQuantizeMatMul", inputs, domain=MS)


def _bias_arg(n):
    """aten.linear node n's bias argument (a node or None)."""
    return n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")


def _bias(b: _Builder, bias):
    """A linear's bias node, or None where it has none or where it is all zeros (adding it does
    nothing; GLM checkpoints initialised by transformers have zero QKV biases)."""
    if bias is None:
        return None
    t = b.tensor(bias)
    values = b.book.recipe(t).full() if b.book.is_lazy(t) else t
    return bias if bool(torch.any(values != 0)) else None


def _linear(b: _Builder, n):
    x, w = n.args[0], n.args[1]
    bias = _bias(b, _bias_arg(n))
    if b.linear16:
        y = _linear16(b, b.emit(x), w)
    else:
        y = b.op("MatMul", [b.emit(x), b.weight(w, transpose=True)])
    y = b.op("Add", [y, b.weight(bias)]) if bias is not None else y
    N, K = b.tensor(w).shape
    return _with_adapters(b, x, w, y, int(K), int(N))


def _linear16(b: _Builder, x, w):
    """y = x W^T as a glmc Linear16 node over W in linear16's block layout and 16-bit dtype: not
    an onnxruntime op; the runtime cuts the graph at these nodes and runs TVM kernels there
    (backends/cpu/runtime16.py). Declined for an output width the kernels cannot take."""
    from glmc.backends.cpu.linear16 import block_width

    if w.op != "get_attr":
        raise Declined(f"a weight computed in the graph ({w.name})")
    N, K = b.tensor(w).shape
    width = block_width(int(N))
    if width is None:
        raise Declined(f"a linear of output width {N}, not a multiple of 8 ({w.name})")
    if b.linear16 == "fp32":
        weight = b.derived(w, b.linear16, lambda r: Blocks(r, width))
    else:
        dtype = torch.bfloat16 if b.linear16 == "bf16" else torch.float16
        weight = b.derived(w, b.linear16, lambda r: Cast(Blocks(r, width), dtype, w.target))
    return b.op("Linear16", [x, weight], {"n": int(N), "k": int(K)}, domain=GLMC)


def row_sources(lazy) -> list[tuple[str, int, int]] | None:
    """The checkpoint tensors (glm names) whose rows make up a weight's rows, in order, as
    (name, first row in the weight, rows); None when the weight is not rows of checkpoint
    tensors (a calibrated weight, a transpose)."""
    if isinstance(lazy, Source):
        return [(lazy.name, 0, lazy.shape[0])]
    if isinstance(lazy, Part) and getattr(lazy.multi, "x", None) is not None:
        return row_sources(lazy.multi.x)
    if isinstance(lazy, Cast):
        return row_sources(lazy.x)
    if isinstance(lazy, Cat):
        out, at = [], 0
        for part in lazy.parts:
            inner = row_sources(part)
            if inner is None:
                return None
            out += [(name, at + r0, rows) for name, r0, rows in inner]
            at += part.shape[0]
        return out
    return None


def _with_adapters(b: _Builder, x, weight, y, K: int, N: int):
    """y + (x @ A[slot]) @ B[slot] for a decoder linear of an artifact with adapter slots."""
    if not b.lora_slots:
        return y
    parts = row_sources(b.book.recipe(b.tensor(weight)))
    if parts is None:
        raise Declined(f"the weight of {weight.name} is not rows of checkpoint tensors, so no adapter can be "
                       "laid onto it (--lora-slots with --calibrate)")
    if not all(name.startswith("model.layers.") for name, _, _ in parts):
        return y                # the lm_head: adapters apply to the decoder linears
    j = len(b.lora_linears)
    R, W = ir.SymbolicDim("lora_rows"), ir.SymbolicDim(f"lora_width_{j}")
    a_in = b._input(f"lora_a_{j}", FLOAT, [R, K, W])
    b_in = b._input(f"lora_b_{j}", FLOAT, [R, W, N])
    b.lora_inputs += [a_in, b_in]
    b.lora_linears.append({"a": a_in.name, "b": b_in.name, "in_features": K, "out_features": N,
                           "parts": [list(p) for p in parts]})
    return b.op("Add", [y, b.op("MatMul", [b.op("MatMul", [b.emit(x), a_in]), b_in])])


def _glu_halves(b: _Builder, n):
    """The gate and up halves of a glu's packed [gate | up] input. Where that input is an fp32
    MatMul used by nothing else, with no bias and no adapters: two MatMuls, each over one half of
    its weight. Measured on small-glm's fp32 decode step (onnxruntime 1.32, 2 threads, one
    process, alternating), a (1024 x 5632) MatMul took 2.4-3.4% longer than two (1024 x 2816)
    ones, and the Split after it ~1% of the step."""
    src = n.args[0]
    if (src.op == "call_function" and src.target == _aten.linear.default and len(src.users) == 1
            and not b.linear16 and not b.lora_slots
            and _bias(b, _bias_arg(src)) is None):
        x, w = b.emit(src.args[0]), src.args[1]
        half = b.tensor(w).shape[0] // 2
        return tuple(b.op("MatMul", [x, b.derived(w, f"{part}_t", lambda r, lo=lo: Transpose(Rows(r, lo, lo + half)))])
                     for part, lo in (("gate", 0), ("up", half)))
    return b.op("Split", [b.emit(src)], {"axis": -1, "num_outputs": 2}, outputs=2)


def _swiglu(b: _Builder, n):
    gate, up = _glu_halves(b, n)
    return b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])


def _geglu(b: _Builder, n):
    gate, up = _glu_halves(b, n)
    return b.op("Mul", [b.op("Gelu", [gate], {"approximate": n.args[1]}), up])


def _reshape(b: _Builder, n):
    """Only the attention block's output (B, H, C, D) -> transpose -> (B, C, H*D) is emitted."""
    src = n.args[0]
    if not (src.target == _aten.transpose.int and src.args[0].target == _glmc.attention.default
            and sorted(src.args[1:]) == [1, 2]):
        raise Declined(f"a reshape outside the attention block ({n.name})")
    return _attention(b, src.args[0])


def _unview(node, what: str):
    """x from transpose(view(x, (B, C, heads, D)), 1, 2)."""
    if not (node.target == _aten.transpose.int and sorted(node.args[1:]) == [1, 2]
            and node.args[0].target in (_aten.view.default, _aten.reshape.default)):
        raise Declined(f"the attention's {what} is not a head view of a projection")
    return node.args[0].args[0]


def _attention(b: _Builder, n):
    q, k, v, _mask, scale, past_k, past_v = (list(n.args) + [None, None])[:7]
    if past_k is None or q.target != _glmc.rotary.default or k.target != _glmc.rotary.default:
        raise Declined("attention without a cache, or without rotary on q and k")
    if q.args[2] is not k.args[2] or q.args[3] is not k.args[3]:
        raise Declined("different rotary tables for q and k")
    cos, sin = q.args[2], q.args[3]
    D = head_dim(b.config)
    half = b.tensor(cos).shape[1]
    if half % 8 or 2 * half > D:
        raise Declined(f"rotary width {2 * half} (GroupQueryAttention's CPU kernel takes multiples of 16 up to head_dim)")
    srcs = [_unview(q.args[0], "query"), _unview(k.args[0], "key"), _unview(v, "value")]
    layers = []
    for past in (past_k, past_v):
        if not (past.target == _aten.slice.Tensor and past.args[0] in b.past_index):
            raise Declined("the attention's cache is not a graph input")
        layers.append(b.past_index[past.args[0]])
    layer = layers[0] // 2
    if layers != [2 * layer, 2 * layer + 1] or layer in b.presents:
        raise Declined("the cache inputs are not in layer order")
    split = {s.args[0] for s in srcs if s.target == operator.getitem}
    if len(split) == 1 and all(s.target == operator.getitem for s in srcs) and [s.args[1] for s in srcs] == [0, 1, 2]:
        qkv = next(iter(split))
        if qkv.target != _aten.split_with_sizes.default or qkv.args[2] not in (-1, 2):
            raise Declined("the packed projection is not split on its last axis")
        ins = [b.emit(qkv.args[0]), None, None]          # packed QKV: one projection, split inside
    else:
        ins = [b.emit(s) for s in srcs]
    H, Hkv = b.config["num_attention_heads"], b.config["num_key_value_heads"]
    out, present_k, present_v = b.op(
        "GroupQueryAttention",
        [*ins, b.past[2 * layer], b.past[2 * layer + 1], b.inputs["seqlens_k"], b.inputs["total_sequence_length"],
         b.weight(cos), b.weight(sin)],
        {"num_heads": H, "kv_num_heads": Hkv, "scale": float(scale), "do_rotary": 1, "rotary_interleaved": 1},
        domain=MS, outputs=3)
    b.presents[layer] = (present_k, present_v)
    return out


def _gather_last(b: _Builder, n):
    """hidden (B, C, H) -> (B, 1, H): the row `last_rows[b]` of the flattened (B*C, H)."""
    x, dim = n.args[0], n.args[1]
    if dim != 1:
        raise Declined("a gather other than the last-token one")
    b.last_token = True
    flat = b.op("Reshape", [b.emit(x), b.const_ints(-1, int(b.config["hidden_size"]))])
    rows = b.op("Gather", [flat, b.inputs["last_rows"]], {"axis": 0})
    return b.op("Unsqueeze", [rows, b.const_ints(1)])


def _is_ids(node) -> bool:
    return node.op == "placeholder" and node.name == "input_ids"


_HANDLERS = {
    _aten.embedding.default: _embedding,
    _glmc.embedding_int8.default: _embedding_int8,
    _glmc.rms_norm.default: _rms_norm,
    _glmc.add_rms_norm.default: _add_rms_norm,
    operator.getitem: _getitem,
    _glmc.linear_nbits.default: _linear_nbits,
    _aten.linear.default: _linear,
    _glmc.swiglu.default: _swiglu,
    _glmc.geglu.default: _geglu,
    _aten.reshape.default: _reshape,
    _aten.gather.default: _gather_last,
}


def fp32_linear_bytes(traced: Traced) -> int:
    """The bytes of the fp32 weights of a traced graph's linears (aten.linear)."""
    total = 0
    for n in traced.gm.graph.nodes:
        if n.op == "call_function" and n.target == _aten.linear.default and n.args[1].op == "get_attr":
            w = operator.attrgetter(n.args[1].target)(traced.gm)
            total += w.numel() * 4 if w.dtype == torch.float32 else 0
    return total


def build_step(traced: Traced, book, config: dict, accuracy_level: int,
               lora_slots: tuple[int, int] | None = None, int8_dynamic: bool = False,
               linear16: str | None = None, linear4: bool = False,
               linear8: bool = False) -> tuple[ir.Model | None, str | None, list]:
    """The lean step graph of a fused extend graph, or (None, why it was declined), and with
    lora_slots (slots, rank) the adapter linears it takes (`_with_adapters`); int8_dynamic:
    int8 decoder linears as DynamicQuantizeMatMul (`_int8_dynamic`; the lm_head keeps
    MatMulNBits: on the trained fixture it is where one activation scale per call cost the
    most, held-out perplexity +0.53% with it, within int8's 0.5% without); linear16 ("bf16" /
    "fp16"): every linear a glmc Linear16 node over 16-bit weights (`_linear16`); linear4 /
    linear8: every symmetric int4 / int8 linear whose shape the kernels take a glmc Linear4 /
    Linear8 node (`_linearq`)."""
    # emission recurses from the logits back along the residual stream: a few frames per
    # node of the longest chain (~10 per layer), more than Python's default allows at 100+ layers
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * len(traced.gm.graph.nodes) + 1000))
    builder = _Builder(traced, book, config, accuracy_level, lora_slots, int8_dynamic, linear16, linear4, linear8)
    try:
        return builder.build(), None, builder.lora_linears
    except Declined as e:
        return None, str(e), []
    finally:
        sys.setrecursionlimit(limit)
