"""glmc's decode attention kernel on the CPU (backends/cpu/attention.py) and where the split
step runs it (backends/cpu/runtime16.py).

Tolerances:
- the kernel against numpy in fp64 (attention.reference): outputs within 1e-5 of the
  largest |output| (fp32 sums in another order, the polynomial exp's < 2e-7 relative
  error), the rotated key written to the cache within 1e-6 of its largest value, the value
  written exactly;
- the kernel against onnxruntime's GroupQueryAttention on the same inputs: the same bounds;
- an `--int4-matmul glmc` artifact decoding with the kernel against the same artifact with
  onnxruntime's kernel (GLMC_CPU_ATTENTION=onnxruntime): 12 greedy decode steps of a ragged
  batch, logits within 1e-4 of the largest |logit|.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import glmc
from glmc.backends.cpu import attention
from glmc.backends.cpu.linear16 import aligned_empty
from glmc.errors import GlmcError
from tests.test_linearq import _all_logits

# (H, Hkv, D, half): a GLM-4 group of 16, partial rotary (half of head_dim rotated), full
# rotary, multi-query (G = 8), multi-head (G = 1), an odd group (G = 3)
SHAPES = [(32, 2, 64, 16), (4, 2, 32, 16), (8, 1, 32, 8), (2, 2, 16, 4), (6, 2, 24, 6)]


def _aligned(a: np.ndarray) -> np.ndarray:
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def _case(H, Hkv, D, half, B=3, S=70, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    W = (H + 2 * Hkv) * D
    qkv = rng.standard_normal((B, W)).astype(np.float32) * 2     # peaked softmax rows too
    b = rng.standard_normal(W).astype(np.float32) if bias else None
    k = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, (S, half))
    seq = np.array([0, S // 2 + 3, S - 1][:B], np.int32)         # first slot, a middle one, the last
    return qkv, b, k, v, seq, np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def _run_kernel(H, Hkv, D, half, qkv, bias, k, v, seq, cos, sin):
    kernel = attention.Attention(H, Hkv, D, half, D ** -0.5, threads=2)
    k, v = _aligned(k), _aligned(v)
    out = _aligned(np.zeros((qkv.shape[0], H * D), np.float32))
    kernel.bound(_aligned(qkv), None if bias is None else _aligned(bias), k, v, _aligned(seq), _aligned(cos),
                 _aligned(sin), out)()
    return out, k, v


def _close(got_out, got_k, got_v, want_out, want_k, want_v):
    assert np.abs(got_out - want_out).max() <= 1e-5 * np.abs(want_out).max()
    assert np.abs(got_k - want_k).max() <= 1e-6 * np.abs(want_k).max()
    np.testing.assert_array_equal(got_v, want_v)


@pytest.mark.parametrize("H,Hkv,D,half", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_the_fp64_reference(H, Hkv, D, half, bias):
    qkv, b, k, v, seq, cos, sin = _case(H, Hkv, D, half, bias=bias)
    got = _run_kernel(H, Hkv, D, half, qkv, b, k, v, seq, cos, sin)
    want_k, want_v = k.copy(), v.copy()
    want = attention.reference(qkv, b, want_k, want_v, seq, cos, sin, H, D ** -0.5)
    _close(*got, want, want_k, want_v)


def _gqa(H, Hkv, D, half, qkv, k, v, seq, cos, sin):
    """onnxruntime's GroupQueryAttention on the same step: packed QKV, the cache shared in place."""
    sess = ort.InferenceSession(attention.groupquery_model(H, Hkv, D, half, D ** -0.5),
                                providers=["CPUExecutionProvider"])
    k, v = k.copy(), v.copy()
    binding = sess.io_binding()
    kv = [ort.OrtValue.ortvalue_from_numpy(a) for a in (k, v)]
    for name, a in (("qkv", qkv[:, None]), ("seq", seq), ("tot", np.array(seq.max() + 1, np.int32)),
                    ("cos", cos), ("sin", sin)):
        binding.bind_cpu_input(name, np.ascontiguousarray(a))
    binding.bind_output("o")
    for (i, o), value in zip((("pk", "k"), ("pv", "v")), kv):
        binding.bind_ortvalue_input(i, value)
        binding.bind_ortvalue_output(o, value)
    sess.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()[:, 0], k, v


@pytest.mark.parametrize("H,Hkv,D,half", SHAPES[:3])
def test_kernel_matches_onnxruntime_groupqueryattention(H, Hkv, D, half):
    """What the kernel replaces: onnxruntime's op on the same step (the bias added first)."""
    qkv, b, k, v, seq, cos, sin = _case(H, Hkv, D, half, seed=1)
    got = _run_kernel(H, Hkv, D, half, qkv, b, k, v, seq, cos, sin)
    _close(*got, *_gqa(H, Hkv, D, half, qkv + b, k, v, seq, cos, sin))


def test_unsupported_shapes_are_refused():
    assert "multiple" in attention.supported(6, 4, 64, 16)
    assert "head_dim" in attention.supported(4, 2, 20, 4)
    assert "rotary width" in attention.supported(4, 2, 32, 24)
    with pytest.raises(GlmcError, match="cannot run here"):
        attention.Attention(6, 4, 64, 16, 0.125, threads=1)


def test_split_step_decodes_attention_with_the_kernel(artifacts, monkeypatch):
    from glmc.backends.cpu.runtime16 import ATTENTION, PIECES

    path = artifacts("glm-gqa", int4_matmul="glmc", verify=True, quant="int4", group_size=32, lm_head="int4")
    runs = {}
    for mode in ("onnxruntime", "glmc"):
        monkeypatch.setenv("GLMC_CPU_ATTENTION", mode)
        model = glmc.load(path)
        step = model.executor.sessions["step"]
        step.timings = {}               # what the planned decode calls, by kind
        runs[mode] = np.stack(_all_logits(model)[1]), dict(step.timings), step
    (want, want_kinds, plain), (got, kinds, split) = runs["onnxruntime"], runs["glmc"]
    # both layers' attention (with its bias Add) is a kernel call in the planned decode
    assert [sum(1 for s in x.steps if getattr(s, "attention", None)) for x in (plain, split)] == [0, 2]
    assert ATTENTION in kinds and PIECES in kinds and ATTENTION not in want_kinds
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
