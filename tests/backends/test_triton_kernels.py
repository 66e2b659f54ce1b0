"""Each Triton kernel against its reference glmc op, on odd shapes and masking edges,
for every config of its cuda and rocm config spaces (small shapes keep the
interpreter fast). Without a GPU they run under TRITON_INTERPRET=1 on CPU
tensors (tests/conftest.py); on a GPU the same tests run on the device."""

from __future__ import annotations

import pytest
import torch

import glmc.ops as ref
from glmc.backends.triton import attention, matmul, rms_norm, rotary, swiglu
from glmc.quant import dequantize, quantize
from tests.tolerances import TOLERANCES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max abs error allowed, per activation dtype: fp32 differs by summation order; fp16
# rounds every stored element (relative 2^-11) and the references round at other points
TOL = {torch.float32: TOLERANCES["kernel_fp32_rel"], torch.float16: TOLERANCES["kernel_fp16_rel"]}
DTYPES = [torch.float32, torch.float16]


def _all_configs(module, *shape):
    seen, out = set(), []
    for c in module.configs_cuda(*shape) + module.configs_rocm(*shape):
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _close(got, want, dtype, scale=1.0):
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max abs error {err:.3g} > {TOL[dtype] * scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [100, 64, 7])
def test_rms_norm(dtype, hidden):
    torch.manual_seed(0)
    x = torch.randn(3, 5, hidden, device=DEVICE).to(dtype)
    r = torch.randn(3, 5, hidden, device=DEVICE).to(dtype)
    w = torch.randn(hidden, device=DEVICE).to(dtype)
    for cfg in _all_configs(rms_norm, hidden):
        _close(rms_norm.rms_norm(x, w, 1e-5, config=cfg), ref.rms_norm(x, w, 1e-5), dtype)
        out, h = rms_norm.rms_norm(x, w, 1e-5, residual=r, config=cfg)
        want_out, want_h = ref.add_rms_norm(x, r, w, 1e-5)
        _close(out, want_out, dtype)
        assert torch.equal(h, want_h)


def test_rms_norm_rejects_bad_shapes():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm.rms_norm(x, torch.ones(7, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="residual shape"):
        rms_norm.rms_norm(x, torch.ones(8, device=DEVICE), 1e-5, residual=torch.randn(3, 8, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    torch.manual_seed(0)
    gu = (3 * torch.randn(4, 3, 2 * 77, device=DEVICE)).to(dtype)     # I = 77: no block divides it
    for cfg in _all_configs(swiglu, 77):
        _close(swiglu.swiglu(gu, config=cfg), ref.swiglu(gu), dtype)
    with pytest.raises(ValueError, match="even"):
        swiglu.swiglu(torch.randn(2, 5, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu(dtype, approximate):
    """glmc::geglu runs on the same gated kernel as swiglu (ACT constexpr), every config."""
    torch.manual_seed(0)
    gu = (3 * torch.randn(4, 3, 2 * 77, device=DEVICE)).to(dtype)
    for cfg in _all_configs(swiglu, 77):
        _close(swiglu.geglu(gu, approximate, config=cfg), ref.geglu(gu, approximate), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,R", [(24, 12), (16, 16), (10, 4)])     # partial rotary, full, odd head dim
def test_rotary(dtype, D, R):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, D, device=DEVICE).to(dtype)
    pos = torch.randint(0, 50, (2, 7), device=DEVICE)
    ang = torch.randn(64, R // 2, device=DEVICE)
    for cfg in _all_configs(rotary, D):
        _close(rotary.rotary(x, pos, ang.cos(), ang.sin(), config=cfg), ref.rotary(x, pos, ang.cos(), ang.sin()), dtype)
    # non-contiguous input (a transposed view, as the graph passes it)
    xt = torch.randn(2, 7, 3, D, device=DEVICE).to(dtype).transpose(1, 2)
    _close(rotary.rotary(xt, pos, ang.cos(), ang.sin()), ref.rotary(xt, pos, ang.cos(), ang.sin()), dtype)


def _causal_mask(B, T, S=0, pad_rows=()):
    m = torch.zeros(B, 1, T, S + T, device=DEVICE)
    m[..., S:] = torch.triu(torch.full((T, T), torch.finfo(torch.float32).min, device=DEVICE), 1)
    for b, n in pad_rows:      # left part of row b's keys are padding
        m[b, ..., :n] = torch.finfo(torch.float32).min
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D", [(6, 2, 24), (4, 4, 16), (8, 1, 8)])   # GQA, MHA, MQA
def test_attention_prefill(dtype, H, Hkv, D):
    torch.manual_seed(0)
    B, T = 2, 19
    q = torch.randn(B, H, T, D, device=DEVICE).to(dtype)
    k = torch.randn(B, Hkv, T, D, device=DEVICE).to(dtype)
    v = torch.randn(B, Hkv, T, D, device=DEVICE).to(dtype)
    mask = _causal_mask(B, T, pad_rows=[(1, 3)])
    want = ref.attention(q, k, v, mask, D ** -0.5)
    configs = _all_configs(attention, H // Hkv * T, T)
    for cfg in configs[:: max(1, len(configs) // 12)]:       # a spread of tile shapes
        _close(attention.attention(q, k, v, mask, D ** -0.5, config=cfg), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [300, 63])
def test_attention_decode_split(dtype, S):
    """Decode over a cache, in one range and split along the cache length."""
    torch.manual_seed(0)
    B, H, Hkv, D = 2, 6, 2, 24
    q = torch.randn(B, H, 1, D, device=DEVICE).to(dtype)
    k, v = (torch.randn(B, Hkv, 1, D, device=DEVICE).to(dtype) for _ in range(2))
    pk, pv = (torch.randn(B, Hkv, S, D, device=DEVICE).to(dtype) for _ in range(2))
    mask = torch.zeros(B, 1, 1, S + 1, device=DEVICE)
    mask[0, ..., S // 2:S] = torch.finfo(torch.float32).min     # row 0: only half its cache is filled
    want = ref.attention(q, k, v, mask, D ** -0.5, pk, pv)
    for split in (0, 32, 64, 256):
        cfg = attention.Config.of(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_N=32, SPLIT_LEN=split)
        _close(attention.attention(q, k, v, mask, D ** -0.5, pk, pv, config=cfg), want, dtype)
    assert any(c["SPLIT_LEN"] for c in attention.configs_cuda(H // Hkv, S + 1)) == (S + 1 > 256)


def test_attention_fp16_scores_do_not_overflow():
    """q.k of ~1.3e5 overflows fp16; the kernel's scores are fp32 from the first product."""
    q = torch.full((1, 2, 4, 16), 90.0, device=DEVICE).half()
    k = torch.full((1, 2, 4, 16), 90.0, device=DEVICE).half()
    v = torch.randn(1, 2, 4, 16, device=DEVICE).half()
    out = attention.attention(q, k, v, _causal_mask(1, 4), 1.0)
    assert torch.isfinite(out).all()
    want = ref.attention(q.double(), k.double(), v.double(), _causal_mask(1, 4).double(), 1.0)
    assert (out.double() - want).abs().max().item() < TOLERANCES["fp16_output"]


def test_attention_rejects_bad_shapes():
    q = torch.randn(1, 6, 3, 8, device=DEVICE)
    k = torch.randn(1, 4, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="grouped-query"):
        attention.attention(q, k, k, _causal_mask(1, 3), 1.0)


def _w(N, K, dtype):
    torch.manual_seed(1)
    return torch.randn(N, K, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 37])          # decode GEMV rows, and a GEMM with ragged tiles
def test_linear_dense(dtype, M):
    N, K = 70, 200
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w, b = _w(N, K, dtype), torch.randn(N, device=DEVICE).to(dtype)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    configs = _all_configs(matmul, M, N, K)
    assert configs, "pruning left no config"
    for cfg in configs[:: max(1, len(configs) // 16)]:
        _close(matmul.linear(x, w, b, config=cfg), want, dtype, scale=10)   # sums of 200 products


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("M", [1, 2, 37])
@pytest.mark.parametrize("K", [200, 77])           # K not a multiple of the group: padded block
def test_linear_quantized(bits, sym, M, K):
    torch.manual_seed(0)
    N, group = 70, 64
    p = quantize(torch.randn(N, K), bits, group, symmetric=sym)
    q, s, z = (t.to(DEVICE) if t is not None else None for t in (p.qweight, p.scales, p.zeros))
    x = torch.randn(M, K, device=DEVICE)
    b = torch.randn(N, device=DEVICE)
    want = ref.linear_nbits(x.cpu(), p.qweight, p.scales, p.zeros, b.cpu(), K, bits, group)
    assert torch.allclose(want, torch.nn.functional.linear(x.cpu(), dequantize(p), b.cpu()), atol=1e-4)
    configs = _all_configs(matmul, M, N, K, group)
    assert configs and all(group % c["BLOCK_K"] == 0 for c in configs if "BLOCK_M" in dict(c.meta))
    for cfg in configs[:: max(1, len(configs) // 10)]:
        got = matmul.linear(x, q, b, s, z, K, bits, group, config=cfg)
        _close(got.cpu(), want, torch.float32, scale=10)


def test_linear_fp16_int4():
    p = quantize(torch.randn(64, 128), 4, 32)
    x = torch.randn(5, 128, device=DEVICE).half()
    got = matmul.linear(x, p.qweight.to(DEVICE), None, p.scales.to(DEVICE), None, 128, 4, 32)
    want = torch.nn.functional.linear(x.float().cpu(), dequantize(p))
    assert got.dtype == torch.float16
    _close(got.cpu(), want, torch.float16, scale=10)


def test_linear_rejects_mismatched_pack():
    p = quantize(torch.randn(16, 64), 4, 32)
    with pytest.raises(ValueError, match="input features"):
        matmul.linear(torch.randn(2, 60, device=DEVICE), p.qweight.to(DEVICE), None, p.scales.to(DEVICE), None,
                      64, 4, 32)
    with pytest.raises(ValueError, match="does not match scales"):
        matmul.linear(torch.randn(2, 64, device=DEVICE), p.qweight.to(DEVICE), None, p.scales.to(DEVICE), None,
                      64, 4, 64)


def test_config_spaces_prune_to_what_fits():
    """Shared memory and divisibility pruning: every GEMM config fits and respects the group."""
    for M, N, K, group in [(512, 4096, 4096, 128), (2048, 12288, 12288, 0), (64, 96, 64, 32)]:
        for vendor, space, smem in (("cuda", matmul.configs_cuda, 227 * 1024), ("rocm", matmul.configs_rocm, 64 * 1024)):
            configs = space(M, N, K, group)
            assert configs, (vendor, M, N, K)
            for c in configs:
                m = dict(c.meta)
                assert (m["BLOCK_M"] * m["BLOCK_K"] + m["BLOCK_K"] * m["BLOCK_N"]) * 2 * c.num_stages <= smem
                assert not group or group % m["BLOCK_K"] == 0
    gfx906 = matmul.configs_rocm(512, 4096, 4096, 128, matrix_cores=False)
    assert max(dict(c.meta)["BLOCK_M"] for c in gfx906) <= 64      # no MFMA: small tiles only
    gemv = matmul.configs_cuda(1, 4096, 4096, 128)
    assert {dict(c.meta)["SPLIT_K"] for c in gemv} == {1, 2, 4, 8}
