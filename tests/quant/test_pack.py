"""Packing and quantize-dequantize error bounds (glmc/quant.py)."""

from __future__ import annotations

import pytest
import torch

from glmc.errors import GlmcError
from glmc.quant import _pack_nibbles, _unpack_nibbles, dequantize, quantize


def test_nibble_pack_unpack_round_trip_exact():
    codes = torch.randint(0, 16, (7, 3, 64), dtype=torch.uint8)
    packed = _pack_nibbles(codes)
    assert packed.shape == (7, 3, 32) and packed.dtype == torch.uint8
    assert torch.equal(_unpack_nibbles(packed), codes)
    assert packed[0, 0, 0] == (codes[0, 0, 0] | (codes[0, 0, 1] << 4))  # low nibble first


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (4, 64, True), (4, 128, True),
                                                    (4, 32, False), (4, 128, False), (8, 128, True)])
@pytest.mark.parametrize("K", [128, 200, 77])
def test_error_is_within_half_a_step(bits, group, symmetric, K):
    torch.manual_seed(0)
    w = torch.randn(24, K) * torch.rand(24, 1) * 3
    p = quantize(w, bits, group, symmetric)
    deq = dequantize(p)
    assert deq.shape == w.shape
    # every element is within half a quantization step of its block's scale
    n_blocks = p.scales.shape[1]
    step = p.scales.repeat_interleave(p.block_size, dim=1)[:, :K]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert p.qweight.shape == (24, n_blocks, group * bits // 8 if bits == 4 else 128)
    rel = float((deq - w).norm() / w.norm())
    assert rel < (0.01 if bits == 8 else 0.15)


def test_requantizing_a_dequantized_weight_is_exact():
    torch.manual_seed(1)
    w = torch.randn(8, 256)
    p = quantize(w, 4, 64, True)
    again = quantize(dequantize(p), 4, 64, True)
    assert torch.equal(again.qweight, p.qweight)
    torch.testing.assert_close(again.scales, p.scales)


def test_zero_block_and_bad_inputs():
    w = torch.zeros(4, 64)
    p = quantize(w, 4, 32, True)
    assert torch.isfinite(p.scales).all() and torch.equal(dequantize(p), w)
    with pytest.raises(GlmcError, match="NaN or Inf"):
        quantize(torch.tensor([[float("nan")] * 32]), 4, 32)
    with pytest.raises(GlmcError, match="power of two"):
        quantize(torch.randn(2, 64), 4, 48)


def test_int4_packed_bytes_are_under_30_percent_of_fp16():
    w = torch.randn(256, 1024)
    p = quantize(w, 4, 128, True)
    assert p.nbytes() / (w.numel() * 2) <= 0.30


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True)])
def test_written_in_row_chunks_equals_quantized_at_once_and_nothing_is_kept(tmp_path, monkeypatch, bits, symmetric):
    """write_safetensors computes a quantized recipe a row chunk at a time (here 5 rows of 37)
    for all its outputs; the file holds what quantizing the whole matrix gives, and once
    written the recipe keeps no chunk (it kept its last one: ~50 MiB per layer at the 9B width)."""
    from safetensors.torch import load_file

    import glmc.weights as W
    from glmc.quant import Quantized

    torch.manual_seed(0)
    w = torch.randn(37, 128)
    monkeypatch.setattr(W, "CHUNK_ELEMENTS", 5 * 128)
    q = Quantized(W.Const(w), bits, 32, symmetric)
    entries = {f"out{i}": q.part(i) for i in range(len(q.outputs))}
    W.write_safetensors(entries, tmp_path / "w.safetensors")
    want = quantize(w, bits, 32, symmetric)
    got = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(got["out0"], want.qweight) and torch.equal(got["out1"], want.scales)
    if len(q.outputs) > 2:
        assert torch.equal(got["out2"], want.zeros)
    assert q._last is None
