"""--dtype bf16 / fp16 on the cpu target: 16-bit linear weights run by TVM kernels between
onnxruntime pieces of the step graph (backends/cpu/linear16.py, runtime16.py); the same kernels
over fp32 weights (--fp32-matmul glmc, the default for fp32 builds).

Tolerances:
- the kernels against numpy on the same 16-bit weights: 1e-5 relative to the largest output
  (fp32 accumulation both sides, in another order);
- artifacts against transformers' fp32 eager model: verify.TOLERANCES for the dtype (bf16
  0.1 + 0.1 max|ref|, fp16 0.02 + 0.02 max|ref|), the bound compile's verification uses;
- a decode step run through its plan (buffers and bindings made once) against the same
  step run without one: 1e-5 (the same kernels and pieces, the same inputs).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import glmc
from glmc.backends.cpu.linear16 import GEMV_MAX_M, TILES, Kernels, aligned_empty, block_width, pack
from glmc.errors import GlmcError
from glmc.verify import TOLERANCES
from glmc.weights import Blocks, Const, write_safetensors
from tests.test_end_to_end import PROMPTS, assert_matches_transformers


def _stored(p: torch.Tensor, dtype: str) -> np.ndarray:
    arr = p.view(torch.int16).numpy().view(np.uint16) if dtype == "bf16" else p.numpy()
    out = aligned_empty(arr.shape, arr.dtype)
    out[...] = arr
    return out


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("K,N", [(64, 256), (100, 48), (352, 1000)])
def test_kernels_match_numpy_on_the_16_bit_weights(dtype, K, N):
    """Both schedules (gemv up to GEMV_MAX_M rows, gemm with its padding rows), every block
    width (32, 16, 8), K not a multiple of the gemv's unrolling."""
    kernels = Kernels([(K, N)], dtype, 2)
    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=g)
    p = pack(w, dtype)
    width = block_width(N)
    assert p.shape == (N // width, K, width)
    dense = p.float().permute(0, 2, 1).reshape(N, K).numpy()     # the stored weights, unpacked
    # the stored values are the weights rounded to the dtype, nothing else
    stored = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    np.testing.assert_array_equal(dense, w.to(stored).float().numpy())
    wt = kernels.tensor(_stored(p, dtype))
    ROWS = TILES[dtype][0]
    for M in sorted({1, GEMV_MAX_M, GEMV_MAX_M + 1, ROWS, ROWS + 1, 2 * ROWS + 3}):
        x = aligned_empty((M + ROWS, K), np.float32)
        x[...] = torch.randn(M + ROWS, K, generator=g).numpy()
        y = aligned_empty((M + ROWS, N), np.float32)
        y[...] = np.nan
        kernels.linear(x, wt, y, M)
        want = x[:M] @ dense.T
        np.testing.assert_allclose(y[:M], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_blocks_recipe_writes_chunk_by_chunk_what_the_whole_weight_gives(tmp_path):
    from safetensors.numpy import load_file

    w = torch.randn(96, 40)
    lazy = Blocks(Const(w), 32)
    assert lazy.shape == (3, 40, 32) and lazy.chunkable
    whole = lazy.full()
    np.testing.assert_array_equal(torch.cat([lazy.rows(0, 1), lazy.rows(1, 3)]).numpy(), whole.numpy())
    np.testing.assert_array_equal(whole[1, :, 5].numpy(), w[32 + 5].numpy())      # block 1, column 5
    write_safetensors({"b": lazy}, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(load_file(str(tmp_path / "w.safetensors"))["b"], whole.numpy())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16_bit_artifact_matches_transformers(dtype, artifacts, checkpoints, reference):
    """Verified at compile (against transformers, the dtype's tolerance); here every position
    of a ragged batch, generation's prefill and 12 decode steps, as the fp32 end-to-end test
    checks fp32 artifacts, at the dtype's tolerance."""
    path = artifacts("glm-gqa", dtype=dtype, verify=True)
    model = glmc.load(path)
    manifest = model.manifest
    assert manifest["backend"]["linear16"] == {"dtype": dtype}
    # every linear is a Linear16 node; no onnxruntime matmul over a weight is left
    hist = manifest["backend"]["op_histogram"]["step"]
    assert hist.get("glmc.cpu::Linear16") == 2 * 4 + 1 and "MatMul" not in hist, hist
    header = json.loads((path / "weights.safetensors").read_bytes()[8:8 + int.from_bytes(
        (path / "weights.safetensors").read_bytes()[:8], "little")])
    sixteen = {"bf16": "BF16", "fp16": "F16"}[dtype]
    assert sum(h["dtype"] == sixteen for k, h in header.items() if k != "__metadata__") == 2 * 4 + 1
    atol, rtol = TOLERANCES[(dtype, "none")]

    def close(got, want):
        assert np.abs(got - want).max() <= atol + rtol * np.abs(want).max()

    assert_matches_transformers(model, reference(checkpoints("glm-gqa")), close)


def test_decode_plan_gives_what_the_step_gives_without_one(artifacts):
    """A decode binding's first two steps run piece by piece; from the third on its plan (buffers
    and bindings made once, the pieces writing where the kernels read). Each step is checked
    against a fresh binding's run of the same step on a copy of the cache. The plan runs glmc's
    decode kernels (backends/cpu/attention.py rotates and writes the new key itself), so the
    caches agree to fp32 rounding in another order (rtol 1e-5), the logits within 1e-5."""
    model = glmc.load(artifacts("glm-gqa", dtype="bf16"))
    ex = model.executor
    cache, last = model.prefill(PROMPTS)
    tokens = last.argmax(-1)
    position = np.array([len(p) for p in PROMPTS])
    planned = 0
    for _ in range(6):
        twin = ex.new_cache(len(PROMPTS))
        for a, b in zip(twin.kv, cache.kv):
            a[...] = b
        twin.lengths[:] = cache.lengths
        ids = tokens[:, None]
        alone = ex._step_call(twin.ort_kv, ids, position, np.arange(len(PROMPTS)), twin.adapter_slot)[:, 0].copy()
        got = ex.decode(cache, ids, position)[:, 0].copy()
        planned += cache.step[1].plan is not None
        np.testing.assert_allclose(got, alone, rtol=0, atol=1e-5)
        for a, b in zip(twin.kv, cache.kv):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        tokens, position = got.argmax(-1), position + 1
    assert planned >= 4         # the plan ran (and was checked) from the third step on


def test_16_bit_cpu_refusals(tmp_path, monkeypatch):
    with pytest.raises(GlmcError, match="--dtype bf16 on the cpu target stores unquantized linears"):
        glmc.compile("tiny-glm", tmp_path / "a.glmc", dtype="bf16", quant="int4")
    with pytest.raises(GlmcError, match="--lora-slots is not built for --dtype fp16"):
        glmc.compile("tiny-glm", tmp_path / "b.glmc", dtype="fp16", lora_slots=2, verify=False)
    assert not (tmp_path / "a.glmc").exists() and not (tmp_path / "b.glmc").exists()
    # without Apache TVM installed: one line naming the extra that brings it
    import glmc.backends.cpu.linear16 as linear16

    monkeypatch.setattr(linear16, "available", lambda: "needs Apache TVM: pip install 'glmc[cpu16]' (apache-tvm)")
    with pytest.raises(GlmcError, match=r"--dtype bf16 on the cpu target needs Apache TVM: pip install 'glmc\[cpu16\]'"):
        glmc.compile("tiny-glm", tmp_path / "c.glmc", dtype="bf16")
    assert not (tmp_path / "c.glmc").exists()


def test_fp32_glmc_refusals_and_where_auto_takes_matmul(tmp_path, monkeypatch):
    """--fp32-matmul glmc asked for where it cannot run: one error naming why, no artifact.
    auto there: onnxruntime's MatMul step, no refusal."""
    for options, message in (
            (dict(quant="int8"), "--fp32-matmul glmc runs the linears of an unquantized --dtype fp32 build"),
            (dict(dtype="bf16"), "--fp32-matmul glmc runs the linears of an unquantized --dtype fp32 build"),
            (dict(kv_cache="fp16"), "--fp32-matmul glmc needs the lean step graph"),
            (dict(lora_slots=2), "--lora-slots runs onnxruntime's MatMul: --fp32-matmul onnxruntime"),
            (dict(fp32_matmul="fast"), "--fp32-matmul must be auto, onnxruntime or glmc, got 'fast'")):
        options = dict(dict(fp32_matmul="glmc", verify=False), **options)
        with pytest.raises(GlmcError, match=message):
            glmc.compile("tiny-glm", tmp_path / "a.glmc", **options)
        assert not (tmp_path / "a.glmc").exists()
    for options in (dict(lora_slots=2), dict(kv_cache="fp16")):
        art = glmc.compile("tiny-glm", tmp_path / "auto.glmc", verify=False, **options)
        assert "linear16" not in glmc.load(art).manifest["backend"]
    import glmc.backends.cpu.linear16 as linear16

    monkeypatch.setattr(linear16, "available", lambda: "needs Apache TVM: pip install 'glmc[cpu16]' (apache-tvm)")
    with pytest.raises(GlmcError, match=r"--fp32-matmul glmc needs Apache TVM: pip install 'glmc\[cpu16\]'"):
        glmc.compile("tiny-glm", tmp_path / "c.glmc", fp32_matmul="glmc")
    art = glmc.compile("tiny-glm", tmp_path / "d.glmc", verify=False, max_seq_len=64)
    hist = glmc.load(art).manifest["backend"]["op_histogram"]["step"]
    assert "MatMul" in hist and "glmc.cpu::Linear16" not in hist, hist
    monkeypatch.undo()
    # with apache-tvm: auto still takes MatMul below FP32_KERNELS_MIN_BYTES of linears (tiny-glm's
    # ~5 MB), glmc's kernels from there up; glmc asked for runs them whatever the size
    import glmc.backends.cpu.lower as lower

    for options, kernels in ((dict(), False), (dict(fp32_matmul="glmc"), True)):
        art = glmc.compile("tiny-glm", tmp_path / "e.glmc", verify=False, max_seq_len=64, **options)
        assert ("linear16" in glmc.load(art).manifest["backend"]) == kernels, options
    monkeypatch.setattr(lower, "FP32_KERNELS_MIN_BYTES", 1 << 20)
    art = glmc.compile("tiny-glm", tmp_path / "f.glmc", verify=False, max_seq_len=64)
    assert glmc.load(art).manifest["backend"]["linear16"] == {"dtype": "fp32"}
