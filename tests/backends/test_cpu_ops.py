"""Each glmc:: op's ONNX lowering (onnxruntime CPU, contrib ops) equals its torch reference.

Tolerance: fp32, 2e-6 max abs (summation order only) unless noted.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from glmc.backends.cpu.lower import export_onnx

import glmc.ops  # noqa: F401
from glmc.trace import Traced
from tests.tolerances import TOLERANCES

TOL = TOLERANCES["onnx_op_fp32"]
g = torch.ops.glmc


class _Call(torch.nn.Module):
    def __init__(self, fn, consts):
        super().__init__()
        self.fn = fn
        for i, c in enumerate(consts):
            self.register_buffer(f"c{i}", c)
        self.n = len(consts)

    def forward(self, *xs):
        return self.fn(*xs, *[getattr(self, f"c{i}") for i in range(self.n)])


def _onnx_vs_torch(fn, inputs, consts=(), dynamic=None):
    module = _Call(fn, consts)
    names = [f"x{i}" for i in range(len(inputs))]
    gm = torch.export.export(module, tuple(inputs), dynamic_shapes=dynamic).module()
    traced = Traced("t", gm, tuple(inputs), dynamic or tuple({} for _ in inputs), names, ["out"])
    proto = export_onnx(traced)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
    want = module(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=0, atol=TOL)
    return proto


def _ops(proto):
    return {(n.domain, n.op_type) for n in proto.graph.node}


def test_rms_norm_and_add_rms_norm():
    x, r = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    w = torch.rand(24) + 0.5
    p = _onnx_vs_torch(lambda x, w: g.rms_norm(x, w, 1e-5), [x], [w])
    assert ("", "RMSNormalization") in _ops(p)
    p = _onnx_vs_torch(lambda x, r, w: g.add_rms_norm(x, r, w, 1e-6), [x, r], [w])
    assert ("com.microsoft", "SkipSimplifiedLayerNormalization") in _ops(p)


def test_swiglu_odd_width():
    _onnx_vs_torch(lambda x: g.swiglu(x), [torch.randn(3, 2, 2 * 37)])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu_lowers_to_onnx_gelu(approximate):
    torch.manual_seed(0)
    p = _onnx_vs_torch(lambda x: g.geglu(x, approximate), [torch.randn(3, 2, 2 * 37)])
    gelu = next(n for n in p.graph.node if n.op_type == "Gelu")
    assert next(a.s for a in gelu.attribute if a.name == "approximate") == approximate.encode()


@pytest.mark.parametrize("D, R", [(16, 8), (16, 16), (24, 12), (8, 2)])
def test_rotary_partial_interleaved(D, R):
    B, H, T, P = 2, 3, 5, 40
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    ang = torch.arange(P, dtype=torch.float32)[:, None] * inv[None]
    pos = torch.tensor([[0, 1, 2, 3, 4], [30, 31, 32, 33, 34]])
    p = _onnx_vs_torch(lambda x, pos, c, s: g.rotary(x, pos, c, s), [torch.randn(B, H, T, D), pos],
                       [torch.cos(ang), torch.sin(ang)])
    assert ("com.microsoft", "RotaryEmbedding") in _ops(p)


def _rotary_reference(x, pos, c, s):
    """transformers' GLM formulation (rotate_half on interleaved pairs), for cross-checking the op."""
    R = 2 * c.shape[1]
    cos = c[pos].unsqueeze(1).repeat_interleave(2, -1)
    sin = s[pos].unsqueeze(1).repeat_interleave(2, -1)
    xr, xp = x[..., :R], x[..., R:]
    rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    return torch.cat((xr * cos + rot * sin, xp), -1)


def test_rotary_reference_matches_transformers_formulation():
    R, P = 12, 20
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    ang = torch.arange(P, dtype=torch.float32)[:, None] * inv[None]
    x, pos = torch.randn(2, 4, 3, 24), torch.randint(0, P, (2, 3))
    torch.testing.assert_close(g.rotary(x, pos, ang.cos(), ang.sin()),
                               _rotary_reference(x, pos, ang.cos(), ang.sin()), rtol=0, atol=TOLERANCES["reference_fp32"])


def _mask(B, T, Tk, valid):
    m = torch.zeros(B, 1, T, Tk)
    for b, n in enumerate(valid):
        m[b, :, :, n:] = torch.finfo(torch.float32).min
    return m


@pytest.mark.parametrize("H, Hkv", [(4, 4), (4, 2), (6, 1)])
def test_attention_prefill_and_decode_with_cache(H, Hkv):
    B, T, S, D = 2, 3, 7, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    causal = torch.zeros(B, 1, T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    _onnx_vs_torch(lambda q, k, v, m: g.attention(q, k, v, m, 0.3), [q, k, v, causal])
    pk, pv = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    q1, k1, v1 = q[:, :, :1], k[:, :, :1], v[:, :, :1]
    mask = _mask(B, 1, S + 1, [S + 1, 4])
    mask[1, ..., -1] = 0  # the new token is always visible
    p = _onnx_vs_torch(lambda q, k, v, m, pk, pv: g.attention(q, k, v, m, 0.3, pk, pv), [q1, k1, v1, mask, pk, pv])
    assert ("com.microsoft", "FusedMatMul") in _ops(p)
    assert ("", "Concat") in _ops(p)
    assert not any(n.op_type == "Expand" for n in p.graph.node), "K/V heads must not be materialised"


def test_attention_reference_equals_repeat_kv_formulation():
    B, H, Hkv, T, S, D = 2, 6, 2, 1, 5, 4
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    pk, pv = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    mask = _mask(B, T, S + T, [6, 3])
    mask[..., -1] = 0
    K = torch.cat((pk, k), 2).repeat_interleave(H // Hkv, 1)
    V = torch.cat((pv, v), 2).repeat_interleave(H // Hkv, 1)
    want = torch.softmax(q @ K.transpose(-1, -2) * 0.5 + mask, -1) @ V
    torch.testing.assert_close(g.attention(q, k, v, mask, 0.5, pk, pv), want, rtol=0, atol=TOLERANCES["reference_fp32"])


def test_fp16_scores_beyond_fp16_range_stay_finite():
    """q.k of ~1.3e5 overflows fp16 (max 65504): a naive fp16 softmax gives NaN; the fused op does not."""
    B, H, T, D = 1, 2, 4, 64
    torch.manual_seed(0)
    q = (torch.randn(B, H, T, D) * 45).half()
    k = (q[:, :, :, :] * 1.0).half()
    v = torch.randn(B, H, T, D).half()
    mask = torch.zeros(B, 1, T, T)
    naive = torch.softmax(q @ k.transpose(-1, -2), -1) @ v        # all fp16
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > 65504
    assert not torch.isfinite(naive).all()
    fused = g.attention(q, k, v, mask, 1.0)
    assert fused.dtype == torch.float16 and torch.isfinite(fused).all()
    exact = torch.softmax(q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
    torch.testing.assert_close(fused.double(), exact, rtol=0, atol=TOLERANCES["fp16_output"])


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (4, 64, False), (8, 128, True)])
def test_linear_nbits_lowers_to_matmulnbits(bits, group, symmetric):
    from glmc.quant import quantize

    torch.manual_seed(0)
    K, N = 200, 48  # K not a multiple of the group: padded blocks
    p = quantize(torch.randn(N, K), bits, group, symmetric)
    consts = [p.qweight, p.scales, torch.randn(N)] + ([p.zeros] if p.zeros is not None else [])

    def fn(x, q, s, b, *z):
        return g.linear_nbits(x, q, s, z[0] if z else None, b, K, bits, group)

    x = torch.randn(2, 3, K)
    module = _Call(fn, consts)
    gm = torch.export.export(module, (x,)).module()
    proto = export_onnx(Traced("t", gm, (x,), ({},), ["x0"], ["out"]), accuracy_level=0)
    assert ("com.microsoft", "MatMulNBits") in _ops(proto)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x0": x.numpy()})[0]
    np.testing.assert_allclose(got, module(x).numpy(), rtol=0, atol=TOLERANCES["artifact_fp32"])
