"""ONNX lowerings of the glmc:: fused ops for onnxruntime's CPU provider.

  glmc::rms_norm      -> RMSNormalization (ONNX opset 23)
  glmc::add_rms_norm  -> com.microsoft.SkipSimplifiedLayerNormalization (output 0 = norm, 3 = sum)
  glmc::rotary        -> com.microsoft.RotaryEmbedding (BNSH input, interleaved=1,
                         rotary_embedding_dim=R for GLM's partial rotary)
  glmc::attention     -> grouped-query attention as com.microsoft.FusedMatMul (transB, alpha=scale)
                         + Softmax in fp32: q is viewed (B, Hkv, rep*T, D) so K/V heads are
                         never repeated, and past/new keys are scored separately so the cache
                         is never concatenated (read once per step, never copied)
  glmc::swiglu        -> Split + Sigmoid + Mul (onnxruntime has no CPU SwiGLU kernel)
  glmc::geglu         -> Split + Gelu (ONNX opset 20, exact or tanh) + Mul
  glmc::linear_nbits  -> com.microsoft.MatMulNBits (glmc's packed format is its layout)
  glmc::embedding_int8 -> Gather (int8 rows) + Cast + Mul by the gathered row scales

Contrib-op semantics (attribute names, layouts, interleaving) follow the onnxruntime
contrib operator docs and are checked against the references in glmc/ops/ in tests/backends.
These lowerings serve the graphs torch.onnx exports (score, and extend where the lean
lowering declines). The generation entry of most artifacts, the step graph, is built by
backends/cpu/lean.py instead, with com.microsoft.GroupQueryAttention over an in-place cache.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema
from onnxscript import opset23 as op
from onnxscript.values import Opset

from glmc.registry import lowering, lowerings, spec

OPSET = 23
MS = "com.microsoft"
msft = Opset(MS, 1)
_BIG = 2**62


def _contrib_schemas() -> list[OpSchema]:
    """Schemas for the contrib ops we emit, so onnxscript can build nodes for them."""
    FP, Opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    A = OpSchema.AttrType
    return [
        OpSchema("SkipSimplifiedLayerNormalization", MS, 1,
                 inputs=[FP("input", "T"), FP("skip", "T"), FP("gamma", "T"), FP("bias", "T", param_option=Opt)],
                 outputs=[FP("output", "T"), FP("mean", "U", param_option=Opt),
                          FP("inv_std_var", "U", param_option=Opt), FP("input_skip_bias_sum", "T", param_option=Opt)],
                 type_constraints=[("T", floats, ""), ("U", ["tensor(float)"], "")],
                 attributes=[OpSchema.Attribute("epsilon", A.FLOAT, "")]),
        OpSchema("RotaryEmbedding", MS, 1,
                 inputs=[FP("input", "T"), FP("position_ids", "M"), FP("cos_cache", "T"), FP("sin_cache", "T")],
                 outputs=[FP("output", "T")],
                 type_constraints=[("T", floats, ""), ("M", ["tensor(int64)"], "")],
                 attributes=[OpSchema.Attribute("interleaved", A.INT, ""), OpSchema.Attribute("num_heads", A.INT, ""),
                             OpSchema.Attribute("rotary_embedding_dim", A.INT, ""), OpSchema.Attribute("scale", A.FLOAT, ""),
                             OpSchema.Attribute("is_packed_batching", A.INT, "")]),
        OpSchema("MatMulNBits", MS, 1,
                 inputs=[FP("A", "T1"), FP("B", "T2"), FP("scales", "T1"), FP("zero_points", "T3", param_option=Opt),
                         FP("g_idx", "T4", param_option=Opt), FP("bias", "T1", param_option=Opt)],
                 outputs=[FP("Y", "T1")],
                 type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], ""),
                                   ("T3", ["tensor(uint8)", *floats], ""), ("T4", ["tensor(int32)"], "")],
                 attributes=[OpSchema.Attribute(a, A.INT, "") for a in ("K", "N", "bits", "block_size", "accuracy_level")]),
        OpSchema("FusedMatMul", MS, 1,
                 inputs=[FP("A", "T"), FP("B", "T")], outputs=[FP("Y", "T")],
                 type_constraints=[("T", floats, "")],
                 attributes=[OpSchema.Attribute("alpha", A.FLOAT, ""), OpSchema.Attribute("transA", A.INT, ""),
                             OpSchema.Attribute("transB", A.INT, ""), OpSchema.Attribute("transBatchA", A.INT, ""),
                             OpSchema.Attribute("transBatchB", A.INT, "")]),
    ]


def register_contrib_schemas() -> None:
    for schema in _contrib_schemas():
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


def _ints(*values):
    return op.Constant(value_ints=list(values))


@lowering("cpu", "rms_norm")
def rms_norm(x, weight, eps: float):
    return op.RMSNormalization(x, weight, axis=-1, epsilon=eps)


@lowering("cpu", "add_rms_norm")
def add_rms_norm(x, residual, weight, eps: float):
    y, _mean, _inv_std, h = msft.SkipSimplifiedLayerNormalization(x, residual, weight, epsilon=eps, _num_outputs=4)
    return y, h


@lowering("cpu", "swiglu")
def swiglu(gate_up):
    gate, up = op.Split(gate_up, axis=-1, num_outputs=2)
    return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)


@lowering("cpu", "geglu")
def geglu(gate_up, approximate: str):
    gate, up = op.Split(gate_up, axis=-1, num_outputs=2)
    return op.Mul(op.Gelu(gate, approximate=approximate), up)


@lowering("cpu", "rotary")
def rotary(x, positions, cos_table, sin_table):
    heads = x.shape[1]
    rot_dim = 2 * cos_table.shape[1]
    return msft.RotaryEmbedding(x, positions, cos_table, sin_table, interleaved=1,
                                num_heads=heads, rotary_embedding_dim=rot_dim)


@lowering("cpu", "attention")
def attention(q, k, v, mask, scale: float, past_k=None, past_v=None):
    H, D, Hkv = q.shape[1], q.shape[3], k.shape[1]
    rep = H // Hkv
    B = op.Shape(q, start=0, end=1)
    T = op.Shape(q, start=2, end=3)
    f32 = onnx.TensorProto.FLOAT
    # scores in fp32 from the start (the casts vanish in fp32 graphs)
    qg = op.Cast(op.Reshape(q, op.Concat(B, _ints(Hkv, -1, D), axis=0)), to=f32)   # (B, Hkv, rep*T, D)
    scores = msft.FusedMatMul(qg, op.Cast(k, to=f32), alpha=scale, transB=1)        # (B, Hkv, rep*T, T)
    if past_k is not None:
        past = msft.FusedMatMul(qg, op.Cast(past_k, to=f32), alpha=scale, transB=1)  # (B, Hkv, rep*T, S)
        scores = op.Concat(past, scores, axis=-1)
    grouped = op.Reshape(scores, op.Concat(B, _ints(Hkv, rep), T, _ints(-1), axis=0))    # (B, Hkv, rep, T, Tk)
    p = op.Softmax(op.Add(grouped, op.Unsqueeze(op.Cast(mask, to=onnx.TensorProto.FLOAT), _ints(1))), axis=-1)
    p = op.CastLike(op.Reshape(p, op.Concat(B, _ints(Hkv, -1), op.Shape(scores, start=-1), axis=0)), v)
    if past_k is not None:
        S = op.Shape(past_k, start=2, end=3)
        out = op.Add(op.MatMul(op.Slice(p, _ints(0), S, _ints(-1)), past_v),
                     op.MatMul(op.Slice(p, S, _ints(_BIG), _ints(-1)), v))
    else:
        out = op.MatMul(p, v)                                                    # (B, Hkv, rep*T, D)
    return op.Reshape(out, op.Concat(B, _ints(H), T, _ints(D), axis=0))


@lowering("cpu", "linear_nbits")
def make_linear_nbits(accuracy_level: int):
    """MatMulNBits with the given accuracy_level: 0 keeps activations fp32; 4 lets the
    kernel quantize activations to int8 per block on the fly (onnxruntime's fast path)."""

    def linear_nbits(x, qweight, scales, zeros, bias, K: int, bits: int, block_size: int):
        N = qweight.shape[0]
        flat_scales = op.Reshape(scales, _ints(-1))
        flat_zeros = op.Reshape(zeros, _ints(-1)) if zeros is not None else None
        return msft.MatMulNBits(x, qweight, flat_scales, flat_zeros, None, bias, K=K, N=N, bits=bits,
                                block_size=block_size, accuracy_level=accuracy_level)

    return linear_nbits


@lowering("cpu", "embedding_int8")
def embedding_int8(ids, qweight, scales):
    rows = op.Cast(op.Gather(qweight, ids, axis=0), to=onnx.TensorProto.FLOAT)
    return op.Mul(rows, op.Unsqueeze(op.Gather(scales, ids, axis=0), _ints(-1)))


# op -> the compile option its registered lowering is a factory of (MatMulNBits' accuracy_level
# is an ONNX attribute, fixed when the graph is exported)
_FACTORIES = {"linear_nbits": "accuracy_level"}


def translation_table(accuracy_level: int = 4) -> dict:
    """torch op -> ONNX function for every glmc op, from the registry."""
    register_contrib_schemas()
    options = {"accuracy_level": accuracy_level}
    table = {}
    for name, fn in lowerings("cpu").items():
        if name in _FACTORIES:
            fn = fn(options[_FACTORIES[name]])
        table[spec(name).overload] = fn
    return table
