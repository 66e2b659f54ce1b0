"""glmc's decode kernels on the CPU: attention (backends/cpu/attention.py), the residual add
+ RMS norm and SwiGLU (backends/cpu/rowwise.py), and the split step that runs them
(backends/cpu/runtime16.py).

Tolerances:
- the kernel against numpy in fp64 (attention.reference): outputs within 1e-5 of the
  largest |output| (fp32 sums in another order, the polynomial exp's < 2e-7 relative
  error), the rotated key written to the cache within 1e-6 of its largest value, the value
  written exactly;
- the kernel against onnxruntime's GroupQueryAttention on the same inputs: the same bounds;
- the row-wise kernels against numpy in fp64: 1e-6 of the largest |output|;
- a `--dtype bf16` artifact decoding with the kernels against the same artifact with
  onnxruntime's ops (GLMC_CPU_DECODE_KERNELS=onnxruntime): 12 decode steps of a ragged batch,
  the same tokens fed to both, logits within 1e-4 of the largest |logit|. (Not an int4 /
  int8 glmc-kernel artifact: those quantize each linear's input to int8, and a 1e-7
  difference that flips one rounding moves the logits by ~1%.)
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import glmc
from glmc.backends.cpu import attention, rowwise
from glmc.errors import GlmcError
from tests.test_linearq import _aligned

# (H, Hkv, D, half): a GLM-4 group of 16, partial rotary (half of head_dim rotated), full
# rotary, multi-query (G = 8), multi-head (G = 1), an odd group (G = 3)
SHAPES = [(32, 2, 64, 16), (4, 2, 32, 16), (8, 1, 32, 8), (2, 2, 16, 4), (6, 2, 24, 6)]


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


@pytest.mark.parametrize("H,Hkv,D,half", SHAPES)
@pytest.mark.parametrize("C", [1, 37])
def test_prompt_kernel_matches_token_by_token_decode_in_fp64(H, Hkv, D, half, C):
    """The prompt kernel's C tokens per row (row 0 from slot 0, row 1 ending at the cache's
    last slot; 37 tokens: several query tiles and a partial one, several key tiles) against
    the fp64 reference run one token at a time: the same outputs and cache (bounds as above)."""
    rng = np.random.default_rng(4)
    B, S, W = 2, 90, (H + 2 * Hkv) * D
    qkv = (rng.standard_normal((B, C, W)) * 2).astype(np.float32)
    b = rng.standard_normal(W).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, S, D)).astype(np.float32) for _ in range(2))
    angle = rng.uniform(0, 2 * np.pi, (S, half))
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    seq = np.array([C - 1, S - 1], np.int32)
    got_k, got_v, out = _aligned(k), _aligned(v), _aligned(np.zeros((B, C, H * D), np.float32))
    attention.Attention(H, Hkv, D, half, D ** -0.5, threads=2).prompt(
        _aligned(qkv), _aligned(b), got_k, got_v, _aligned(seq), _aligned(cos), _aligned(sin), out)
    want_k, want_v = k.copy(), v.copy()
    want = np.stack([attention.reference(qkv[:, c], b, want_k, want_v, seq - C + 1 + c, cos, sin, H, D ** -0.5)
                     for c in range(C)], axis=1)
    _close(out, got_k, got_v, want, want_k, want_v)


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


@pytest.mark.parametrize("M", [5, rowwise.MAX_ROWS + 21])     # the serial kernels, the parallel twins (prompts)
def test_row_kernels_match_numpy(M):
    rng = np.random.default_rng(2)
    kernels = rowwise.RowKernels([(64, 1e-5), (24, 1e-6)], [48], threads=2)
    for H, eps in ((64, 1e-5), (24, 1e-6)):
        x, skip, gamma = (_aligned(rng.standard_normal(shape).astype(np.float32)) for shape in ((M, H), (M, H), (H,)))
        y, s = _aligned(np.zeros((M, H), np.float32)), _aligned(np.zeros((M, H), np.float32))
        kernels.skip_norm(x, skip, gamma, y, s, eps)()
        want_s = x.astype(np.float64) + skip
        want = want_s / np.sqrt((want_s ** 2).mean(-1, keepdims=True) + eps) * gamma
        assert np.abs(y - want).max() <= 1e-6 * np.abs(want).max()
        assert np.abs(s - want_s).max() <= 1e-6 * np.abs(want_s).max()
    x = _aligned((rng.standard_normal((M, 96)) * 4).astype(np.float32))     # sigmoid's tails too
    y = _aligned(np.zeros((M, 48), np.float32))
    kernels.swiglu(x, y)()
    a, b = x[:, :48].astype(np.float64), x[:, 48:]
    want = a / (1 + np.exp(-a)) * b
    assert np.abs(y - want).max() <= 1e-6 * np.abs(want).max()


def test_split_step_decodes_with_the_kernels(artifacts, monkeypatch):
    from glmc.backends.cpu.runtime16 import ATTENTION, PIECES, ROWWISE, _Attention, _SkipNorm, _SwiGLU

    path = artifacts("glm-gqa", dtype="bf16")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    feed = np.random.default_rng(3).integers(5, 200, (12, 2))
    runs = {}
    for mode in ("onnxruntime", "glmc"):
        monkeypatch.setenv("GLMC_CPU_DECODE_KERNELS", mode)
        model = glmc.load(path)
        step = model.executor.sessions["step"]
        step.timings = {}               # what the planned decode calls, by kind
        cache, _ = model.prefill(prompts)
        position, logits = np.array([len(p) for p in prompts]), []
        for tokens in feed:
            logits.append(model.executor.decode(cache, tokens[:, None], position)[:, 0].copy())
            position = position + 1
        kinds = [type(getattr(s, "kernel", None)) for s in step.steps]
        runs[mode] = np.stack(logits), dict(step.timings), kinds
    (want, want_timed, plain), (got, timed, split) = runs["onnxruntime"], runs["glmc"]
    # per layer (2): the attention, both norms after it and the SwiGLU; the first layer's norm
    # and the final one sit in pieces with other nodes (the embedding, the last-row gather)
    assert [kinds.count(k) for kinds in (plain, split) for k in (_Attention, _SkipNorm, _SwiGLU)] == [0, 0, 0, 2, 3, 2]
    assert ATTENTION in timed and ROWWISE in timed and PIECES in timed
    assert ATTENTION not in want_timed and ROWWISE not in want_timed
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_a_prompt_gives_its_freed_memory_back(artifacts, monkeypatch):
    """After a call of more than TRIM_ROWS rows the split step hands glibc's freed heap back
    (its pieces run without an arena: small-glm held 1265 MB after a 2000-token prompt, 812
    with this); decode steps and shorter prompts (up to 512 tokens: 3 ms of a 128-token small-glm
    prompt's 70, re-faulting the pages included) do not pay for it."""
    from glmc.backends.cpu import runtime16

    calls = []
    monkeypatch.setattr(runtime16, "release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(runtime16, "TRIM_ROWS", 16)         # the test model holds fewer slots than the default
    model = glmc.load(artifacts("glm-gqa", dtype="bf16"))
    prompt = [list(range(5, 5 + runtime16.TRIM_ROWS + 6))]
    cache, last = model.prefill(prompt)
    assert calls == [1]
    position = np.array([len(prompt[0])])
    for _ in range(3):
        model.executor.decode(cache, last.argmax(-1)[:, None], position)
        position = position + 1
    model.prefill([[5, 6, 7]])
    assert calls == [1]


def test_the_switch_takes_two_values(monkeypatch):
    from glmc.settings import cpu_decode_kernels

    for value, on in (("glmc", True), ("onnxruntime", False)):
        monkeypatch.setenv("GLMC_CPU_DECODE_KERNELS", value)
        assert cpu_decode_kernels() is on
    monkeypatch.delenv("GLMC_CPU_DECODE_KERNELS")
    assert cpu_decode_kernels() is True
    monkeypatch.setenv("GLMC_CPU_DECODE_KERNELS", "tvm")
    with pytest.raises(GlmcError, match="GLMC_CPU_DECODE_KERNELS='tvm': expected glmc or onnxruntime"):
        cpu_decode_kernels()


def test_a_finished_caches_buffers_and_plan_serve_the_next_request(artifacts):
    """new_cache hands a finished step cache's buffers, decode binding and split-step plan to
    the next cache of the same batch size: its first decode step runs planned, its tokens and
    logits are a fresh executor's (1e-5 of the largest |logit|: the longer earlier prompt's
    slots past the new row's length are never read), and buffers still in use (a live cache, a view's parent) are not
    handed on."""
    import gc

    path = artifacts("glm-gqa", quant="int4", group_size=32)        # the default: glmc's kernels

    def request(ex, prompt, steps=6):
        cache = ex.new_cache(1)
        ids = np.array([prompt], np.int64)
        last = ex.prefill(cache, ids, np.ones_like(ids))
        planned = cache.step is not None and cache.step[1].plan is not None
        tok, pos, out = int(last[0].argmax()), np.array([len(prompt)]), [last[0].copy()]
        for _ in range(steps):
            logits = ex.decode(cache, np.array([[tok]]), pos)[0, 0]
            out.append(logits.copy())
            tok, pos = int(logits.argmax()), pos + 1
        return cache, planned, np.stack(out)

    long, short = list(range(5, 45)), [7, 8, 9]
    fresh = glmc.load(path).executor
    _, _, want = request(fresh, short)
    ex = glmc.load(path).executor
    first, planned, _ = request(ex, long)
    assert not planned
    buffers = first.k[0]
    second = ex.new_cache(1)
    assert second.k[0] is not buffers                   # the first is still alive
    del second          # finished first: the first cache, finished last, is the one kept
    del first
    gc.collect()
    third, planned, got = request(ex, short)
    assert third.k[0] is buffers and planned
    # the fresh executor's first two steps run unplanned (onnxruntime's attention and norms):
    # within 1e-5 of the largest |logit|; a stale slot read would move them by far more
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).all()
    view = third.rows(0, 1)
    del third
    gc.collect()
    assert ex.new_cache(1).k[0] is not buffers          # the view still reads them
    del view


def test_prompts_run_attention_norms_and_swiglus_as_kernels(artifacts, monkeypatch):
    """A prompt runs its attention as the prompt kernel (all of a row's tokens at once) and its
    norm and SwiGLU pieces as the parallel row-wise kernels (more rows than the serial ones
    take): the prompt logits of a ragged batch and of a long single prompt within 1e-4 of the
    largest |logit| of the same artifact on onnxruntime's ops, and so are the logits of decode
    steps that read the cache the prompt kernel wrote."""
    from glmc.backends.cpu import runtime16

    path = artifacts("glm-gqa", dtype="bf16")
    prompts = [[list(range(5, 45)), list(range(50, 71))], [list(range(7, 70))]]
    wrapped = {name: getattr(runtime16.SplitStep, name) for name in ("_run_rowwise", "_run_attention")}
    runs = {}
    for mode in ("onnxruntime", "glmc"):
        monkeypatch.setenv("GLMC_CPU_DECODE_KERNELS", mode)
        ran = {name: [] for name in wrapped}
        for name, run in wrapped.items():
            monkeypatch.setattr(runtime16.SplitStep, name, lambda self, step, *a, name=name, run=run:
                                ran[name].append(run(self, step, *a)) or ran[name][-1])
        model = glmc.load(path)
        logits = []
        for batch in prompts:
            cache, last = model.prefill(batch)
            logits.append(last)
            position = np.array([len(p) for p in batch])
            for token in (11, 12, 13):
                logits.append(model.executor.decode(cache, np.full((len(batch), 1), token), position)[:, 0].copy())
                position = position + 1
        runs[mode] = logits, {name: sum(made is not None for made in got) for name, got in ran.items()}
    (want, plain), (got, kernels) = runs["onnxruntime"], runs["glmc"]
    assert plain == {"_run_rowwise": 0, "_run_attention": 0}
    # per prompt: 2 layers' attention; their 2 norms and SwiGLU, minus the first norm (the
    # embedding's piece); decode steps 1-2 run unplanned too: their attention and norms as well
    assert kernels == {"_run_rowwise": 2 * 5 * 3, "_run_attention": 2 * 2 * 3}
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max()
