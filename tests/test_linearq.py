"""--int4-matmul glmc / --int8-matmul glmc on the cpu target: int4 / int8 linears run by glmc's TVM kernels
(backends/cpu/linearq.py) between onnxruntime pieces of the step graph (runtime16.py).

Tolerances:
- the kernels against numpy doing the same arithmetic (x quantized to int8 per group, round
  half to even, integer sums, fp32 scaling): 1e-5 relative to the largest output (fp32
  rounding in another order);
- the same kernels against the unquantized x: 2% of the largest output (int8 activations);
- an artifact against the MatMulNBits artifact of the same weights (both quantize the
  activations to int8 per group): logits within 2% of the largest |logit|, every position
  of a ragged batch and 12 greedy decode steps; and compile's own verification against
  transformers (the int4 gate) passes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import glmc
from glmc.backends.cpu import linearq
from glmc.backends.cpu.linear16 import aligned_empty
from glmc.errors import GlmcError
from glmc.quant import dequantize, quantize
from glmc.weights import Const, write_safetensors
from tests.test_end_to_end import PROMPTS


def _aligned(a: np.ndarray) -> np.ndarray:
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def _codes(p) -> torch.Tensor:
    return torch.stack((p.qweight & 15, p.qweight >> 4), -1).reshape(p.N, -1)[:, :p.K]


def _reference(x: np.ndarray, p) -> np.ndarray:
    """What the kernels compute, in numpy: x quantized per group, integer dot products, scaled."""
    G = p.block_size
    xg = x.reshape(len(x), -1, G).astype(np.float64)
    sx = np.abs(xg).max(-1) / 127
    xq = np.round(np.divide(xg, sx[..., None], out=np.zeros_like(xg), where=sx[..., None] > 0))
    codes = _codes(p).numpy().reshape(p.N, -1, G).astype(np.float64) - 8
    dots = np.einsum("mgk,ngk->mng", xq, codes)
    return np.einsum("mng,mg,ng->mn", dots, sx, p.scales.double().numpy())


@pytest.mark.parametrize("K,N,block", [(256, 64, 32), (512, 96, 128), (384, 1000, 64)])
def test_kernels_match_the_int8_activation_arithmetic(K, N, block):
    """gemv (1, 2 rows) and gemm (its padding rows), block widths 32 / 16 / 8, groups 32 to 128."""
    kernels = linearq.Kernels([(K, N, block, 4)], 2)
    g = torch.Generator().manual_seed(K + N)
    p = quantize(torch.randn(N, K, generator=g), 4, block, True)
    w = kernels.tensor((_aligned(linearq.pack_codes(_codes(p)).numpy()),
                        _aligned(linearq.pack_scales(p.scales).numpy())))
    dense = dequantize(p).numpy()
    for M in (1, 2, 3, 4, 5, 8, 11, 19):       # gemv; gemm on 4-row tiles (3, 11, 19) and 8-row ones (5, 8)
        x = aligned_empty((linearq.padded_rows(M), K), np.float32)
        x[...] = torch.randn(x.shape, generator=g).numpy()
        y = aligned_empty((linearq.padded_rows(M), N), np.float32)
        y[...] = np.nan
        kernels.linear(x, w, y, M)
        want = _reference(x[:M], p)
        np.testing.assert_allclose(y[:M], want, rtol=0, atol=1e-5 * np.abs(want).max())
        exact = x[:M] @ dense.T
        assert np.abs(y[:M] - exact).max() <= 0.02 * np.abs(exact).max()


def test_kernels_cut_into_any_number_of_tasks_give_the_same_bits(monkeypatch):
    """Each parallel loop runs one task per TVM worker (TVM_NUM_THREADS), over a contiguous
    range of column blocks / (block, row tile) pairs: 3 tasks over 125 blocks (and 375 gemm
    pairs) split unevenly, and must give what 2 tasks give, bit for bit (each output's sums
    run in the same order whoever computes them)."""
    K, N, block = 384, 1000, 64
    g = torch.Generator().manual_seed(7)
    p = quantize(torch.randn(N, K, generator=g), 4, block, True)
    codes, scales = _aligned(linearq.pack_codes(_codes(p)).numpy()), _aligned(linearq.pack_scales(p.scales).numpy())
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    two = linearq.Kernels([(K, N, block, 4)], 2)
    x = aligned_empty((1, K), np.float32)
    x[...] = 1
    # TVM makes its pool at the first parallel call, reading TVM_NUM_THREADS then: made here
    # with 2 workers, so that 3 below cuts the loops only, and later tests get a 2-worker pool
    two.linear(x, two.tensor((codes, scales)), aligned_empty((1, N), np.float32), 1)
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    three = linearq.Kernels([(K, N, block, 4)], 2)
    for M in (1, 11, 16):
        x = aligned_empty((linearq.padded_rows(M), K), np.float32)
        x[...] = torch.randn(x.shape, generator=g).numpy()
        ys = []
        for kernels in (two, three):
            y = aligned_empty((linearq.padded_rows(M), N), np.float32)
            y[...] = np.nan
            kernels.linear(x, kernels.tensor((codes, scales)), y, M)
            ys.append(y[:M])
        np.testing.assert_array_equal(ys[0], ys[1])
        assert np.isfinite(ys[0]).all()


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_tvm_thread_count_is_one_error(monkeypatch, value):
    monkeypatch.setenv("TVM_NUM_THREADS", value)
    with pytest.raises(GlmcError, match=f"TVM_NUM_THREADS={value!r}: expected a positive integer"):
        linearq.Kernels([(256, 64, 32, 4)], 2)


def _reference8(x: np.ndarray, p) -> np.ndarray:
    """The int8 kernels' arithmetic in numpy: x quantized per x_group(K), integer dot products."""
    G = linearq.x_group(p.K)
    xg = x.reshape(len(x), -1, G).astype(np.float64)
    sx = np.abs(xg).max(-1) / 127
    xq = np.round(np.divide(xg, sx[..., None], out=np.zeros_like(xg), where=sx[..., None] > 0))
    w = p.qweight.reshape(p.N, -1)[:, :p.K].double().numpy().reshape(p.N, -1, G) - 128
    return np.einsum("mgk,ngk,mg->mn", xq, w, sx) * p.scales[:, 0].double().numpy()


@pytest.mark.parametrize("K,N", [(256, 64), (96, 48), (384, 1000)])
def test_int8_kernels_match_the_int8_activation_arithmetic(K, N):
    """gemv and gemm, block widths 32 / 16 / 8, activation groups 128 / 32 / 128."""
    p = quantize(torch.randn(N, K, generator=torch.Generator().manual_seed(K)), 8, 128, True)
    kernels = linearq.Kernels([(K, N, linearq.x_group(K), 8)], 2)
    codes = linearq.codes8_layout(p.qweight, K, linearq.block_width(N))
    assert codes.dtype == torch.int8 and codes.shape == (N // linearq.block_width(N), K // 4, linearq.block_width(N) // 8, 32)
    w = kernels.tensor((_aligned(codes.numpy()), _aligned(linearq.pack_scales(p.scales).numpy())))
    dense = dequantize(p).numpy()
    g = torch.Generator().manual_seed(N)
    for M in (1, 2, 3, 5, 16):
        x = aligned_empty((linearq.padded_rows(M), K), np.float32)
        x[...] = torch.randn(x.shape, generator=g).numpy()
        y = aligned_empty((linearq.padded_rows(M), N), np.float32)
        kernels.linear(x, w, y, M)
        want = _reference8(x[:M], p)
        np.testing.assert_allclose(y[:M], want, rtol=0, atol=1e-5 * np.abs(want).max())
        exact = x[:M] @ dense.T
        assert np.abs(y[:M] - exact).max() <= 0.02 * np.abs(exact).max()


def test_codes_layout_and_its_recipe(tmp_path):
    """The layout byte by byte, from glmc.quant's packed codes; the recipe written chunk by
    chunk equals the whole."""
    from safetensors.numpy import load_file

    K, N, block = 64, 48, 32                    # block width 16: two sub-blocks of 8 columns
    p = quantize(torch.randn(N, K), 4, block, True)
    codes = _codes(p)
    laid = linearq.codes_layout(p.qweight, K, 16)
    assert laid.shape == (N // 16, K // 8, 2, 32)
    for nb, k8, j, byte in ((0, 0, 0, 0), (1, 3, 1, 13), (2, 7, 1, 31)):
        col, i = nb * 16 + j * 8 + byte // 4, byte % 4
        assert int(laid[nb, k8, j, byte]) == int(codes[col, 8 * k8 + i]) | int(codes[col, 8 * k8 + 4 + i]) << 4
    lazy = linearq.Codes(Const(p.qweight), 16, K, 4)
    assert lazy.shape == tuple(laid.shape) and lazy.chunkable
    np.testing.assert_array_equal(torch.cat([lazy.rows(0, 1), lazy.rows(1, 3)]).numpy(), laid.numpy())
    write_safetensors({"c": lazy}, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(load_file(str(tmp_path / "w.safetensors"))["c"], laid.numpy())


def _all_logits(model):
    """Every position of a ragged batch, then 12 greedy decode steps' logits."""
    full = model.logits(PROMPTS)
    cache, last = model.prefill(PROMPTS)
    tokens, position, steps = last.argmax(-1), np.array([len(p) for p in PROMPTS]), []
    for _ in range(12):
        step = model.executor.decode(cache, tokens[:, None], position)[:, 0].copy()
        steps.append(step)
        tokens, position = step.argmax(-1), position + 1
    return full, steps


def test_int4_glmc_artifact_matches_the_matmulnbits_one(artifacts):
    opts = dict(quant="int4", group_size=32, lm_head="int4")
    path = artifacts("glm-gqa", int4_matmul="glmc", verify=True, **opts)
    model = glmc.load(path)
    backend = model.manifest["backend"]
    hist = backend["op_histogram"]["step"]
    # every linear, the lm_head too, is a Linear4 node: no MatMulNBits left
    assert hist.get("glmc.cpu::Linear4") == 2 * 4 + 1 and "com.microsoft::MatMulNBits" not in hist, hist
    assert backend["linearq"] == {"Linear4": 9, "Linear8": 0}
    assert json.loads((path / "report.json").read_text())["quantization"]["int4_matmul"] == "glmc"
    full, steps = _all_logits(model)
    want_full, want_steps = _all_logits(glmc.load(artifacts("glm-gqa", int4_matmul="nbits", int8_matmul="nbits",
                                                            **opts)))
    for b in range(len(PROMPTS)):
        assert np.abs(full[b] - want_full[b]).max() <= 0.02 * np.abs(want_full[b]).max()
    for got, want in zip(steps, want_steps):
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_int8_glmc_artifact_matches_the_matmulnbits_one(artifacts):
    """--int8-matmul glmc: every int8 linear (the lm_head too) a Linear8 node."""
    path = artifacts("glm-gqa", quant="int8", int8_matmul="glmc", verify=True)
    model = glmc.load(path)
    hist = model.manifest["backend"]["op_histogram"]["step"]
    assert model.manifest["backend"]["linearq"] == {"Linear4": 0, "Linear8": 9}
    assert "com.microsoft::MatMulNBits" not in hist, hist
    full, steps = _all_logits(model)
    want_full, want_steps = _all_logits(glmc.load(artifacts("glm-gqa", quant="int8", int8_matmul="nbits")))
    for got, want in [*zip(full, want_full), *zip(steps, want_steps)]:
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_int4_glmc_refusals(tmp_path, monkeypatch):
    for options, message in (
            (dict(quant="int8"), "--int4-matmul glmc needs --quant int4"),
            (dict(quant="int4", symmetric=False), "--int4-matmul glmc runs symmetric int4; drop --asym"),
            (dict(quant="int4", group_size=16), "needs a group size that is a multiple of 32, got 16"),
            (dict(quant="int4", kv_cache="fp16"), "--int4-matmul glmc needs the lean step graph"),
            (dict(quant="int4", lora_slots=2), "--lora-slots is not built for --int4-matmul glmc"),
            (dict(quant="int4", accuracy_level=0), "--int4-matmul glmc computes with int8 activations"),
            (dict(quant="none", int4_matmul="nbits", int8_matmul="glmc"), "--int8-matmul glmc needs int8 linears"),
            (dict(quant="int8", int4_matmul="nbits", int8_matmul="glmc", lora_slots=2),
             "--lora-slots is not built for --int8-matmul glmc"),
            (dict(quant="int4", int4_matmul="fast"), "--int4-matmul must be auto, nbits or glmc, got 'fast'")):
        options = dict(dict(int4_matmul="glmc", verify=False), **options)
        with pytest.raises(GlmcError, match=message):
            glmc.compile("tiny-glm", tmp_path / "a.glmc", **options)
        assert not (tmp_path / "a.glmc").exists()
    import glmc.backends.cpu.linear16 as linear16

    monkeypatch.setattr(linear16, "available", lambda: "needs Apache TVM: pip install 'glmc[cpu16]' (apache-tvm)")
    with pytest.raises(GlmcError, match=r"--int4-matmul glmc needs Apache TVM: pip install 'glmc\[cpu16\]'"):
        glmc.compile("tiny-glm", tmp_path / "c.glmc", quant="int4", int4_matmul="glmc")
    assert not (tmp_path / "c.glmc").exists()


def test_built_kernels_are_kept_and_loaded_from_the_cache(tmp_path, monkeypatch):
    """A second build of the same kernels loads the library the first one kept (and computes
    the same); other kernels get an entry of their own."""
    import glmc.backends.cpu.tvm_build as tvm_build

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    K, N, block = 64, 32, 32
    first = linearq.Kernels([(K, N, block, 4)], 2)
    kept = list((tmp_path / "glmc" / "kernels").glob("*.so"))
    assert len(kept) == 1
    compiled = []
    monkeypatch.setattr("tvm.compile", lambda *a, **k: compiled.append(a) or pytest.fail("rebuilt"))
    assert linearq.Kernels([(K, N, block, 4)], 2)._lib is first._lib        # this process's: made once
    monkeypatch.setattr(tvm_build, "_BUILT", {})        # a new process: from the cache directory,
    for factory in ("_quantize", "_gemv", "_gemm"):                                  # without making the TIR
        monkeypatch.setattr(linearq, factory, lambda *a: pytest.fail("TIR made"))
    second = linearq.Kernels([(K, N, block, 4)], 2)
    assert not compiled and second._lib is not first._lib
    p = quantize(torch.randn(N, K), 4, block, True)
    x = aligned_empty((1, K), np.float32)
    x[...] = np.random.default_rng(0).standard_normal((1, K))
    ys = []
    for kernels in (first, second):
        w = kernels.tensor((_aligned(linearq.pack_codes(_codes(p)).numpy()), _aligned(linearq.pack_scales(p.scales).numpy())))
        ys.append(aligned_empty((1, N), np.float32))
        kernels.linear(x, w, ys[-1], 1)
    np.testing.assert_array_equal(ys[0], ys[1])
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    linearq.Kernels([(K, 2 * N, block, 4)], 2)
    assert len(list((tmp_path / "glmc" / "kernels").glob("*.so"))) == 2
    assert tvm_build.cpu_features(tvm_build.host_target(2))        # what the key holds


def test_kernels_parse_to_the_same_tir_as_tvm_script_prim_func(monkeypatch):
    """tvm_build.prim_func (no call-stack walk) against tvm.script's own T.prim_func, on kernels
    whose annotations use the factory's locals."""
    from tvm.script import tirx as T

    import glmc.backends.cpu.tvm_build as tvm_build

    ours = [linearq._gemv(256, 64, 32, "g", 2), linearq._gemm(256, 96, 64, "m", 3, bits=8),
            linearq._quantize(256, 32, "q", 2)]
    monkeypatch.setattr(linearq, "prim_func", T.prim_func)
    theirs = [linearq._gemv(256, 64, 32, "g", 2), linearq._gemm(256, 96, 64, "m", 3, bits=8),
              linearq._quantize(256, 32, "q", 2)]
    for a, b in zip(ours, theirs):
        assert a.script() == b.script()
    assert tvm_build.prim_func.dispatch_token == "tirx"


def test_layouts_of_one_quantization_are_written_from_one_computation(tmp_path, monkeypatch):
    """The codes and the blocked scales are layouts of the same quantization's rows: the writer
    computes each chunk of it once for both (the 9B compile quantized every weight twice), in
    chunks of whole column blocks, and releases it once written (at 9B its last chunks held 15 GB)."""
    from safetensors.numpy import load_file

    import glmc.weights as weights
    from glmc.quant import Quantized
    from glmc.weights import Blocks

    monkeypatch.setattr(weights, "CHUNK_ELEMENTS", 100 * 64)     # 100 rows: 96, whole blocks of 32
    w = torch.randn(256, 64)
    q = Quantized(Const(w), 4, 32, True)
    calls = []
    compute = q._compute
    monkeypatch.setattr(q, "_compute", lambda rows: calls.append(len(rows)) or compute(rows))
    entries = {"codes": linearq.Codes(q.part(0), 32, 64, 4), "scales": Blocks(q.part(1), 32)}
    write_safetensors(entries, tmp_path / "w.safetensors")
    assert calls == [96, 96, 64]
    assert q._last is None
    got, p = load_file(str(tmp_path / "w.safetensors")), quantize(w, 4, 32, True)
    np.testing.assert_array_equal(got["codes"], linearq.codes_layout(p.qweight, 64, 32).numpy())
    np.testing.assert_array_equal(got["scales"], linearq.pack_scales(p.scales).numpy())


def test_the_default_runs_quantized_linears_on_glmc_kernels_where_they_can(artifacts, monkeypatch):
    """--int4-matmul / --int8-matmul auto (the default): glmc's kernels where the build and this
    CPU take them, else MatMulNBits; the choice is in the report, and never an error."""
    from glmc.backends import get_backend
    from glmc.compiler import resolve_matmuls
    from glmc.ir import QuantConfig
    from glmc.target import Target

    path = artifacts("glm-gqa", quant="int4", group_size=32)
    backend = glmc.load(path).manifest["backend"]
    assert backend["linearq"] == {"Linear4": 8, "Linear8": 1}        # 2 layers x 4, and the int8 lm_head
    assert "com.microsoft::MatMulNBits" not in backend["op_histogram"]["step"]
    q = json.loads((path / "report.json").read_text())["quantization"]
    assert (q["int4_matmul"], q["int8_matmul"]) == ("glmc", "glmc")
    # chatglm's rotary width: no lean step graph, so MatMulNBits (explicit glmc is refused there)
    path = artifacts("chatglm", quant="int4", group_size=32)
    assert not glmc.load(path).manifest["backend"].get("linearq")
    q = json.loads((path / "report.json").read_text())["quantization"]
    assert (q["int4_matmul"], q["int8_matmul"]) == ("nbits", "nbits")
    with pytest.raises(GlmcError, match="--int4-matmul glmc needs the lean step graph"):
        artifacts("chatglm", quant="int4", group_size=32, int4_matmul="glmc")

    cpu = get_backend(Target.parse("cpu"))
    resolve = lambda lora_slots=0, target=cpu, **q: resolve_matmuls(target, QuantConfig(**q), lora_slots)  # noqa: E731
    assert resolve(mode="int4") == QuantConfig("int4", int4_matmul="glmc", int8_matmul="glmc", fp32_matmul="onnxruntime",
                                               auto=("int4_matmul", "int8_matmul"))
    assert resolve(mode="int8", int4_matmul="nbits") == QuantConfig("int8", int4_matmul="nbits", int8_matmul="glmc",
                                                                    fp32_matmul="onnxruntime", auto=("int8_matmul",))
    # int4 only where it is symmetric with groups of a multiple of 32; the int8 lm_head still
    for q in (dict(symmetric=False), dict(group_size=16)):
        assert (resolve(mode="int4", **q).int4_matmul, resolve(mode="int4", **q).int8_matmul) == ("nbits", "glmc")
    for case in (dict(mode="int4", kv_cache="fp16"), dict(mode="int4", lora_slots=2), dict(mode="int8",
                 accuracy_level=0), dict(mode="none"), dict(mode="int4", target=get_backend(Target.parse("cuda")))):
        q = resolve(**case)
        assert (q.int4_matmul, q.int8_matmul) == ("nbits", "nbits") and not {"int4_matmul", "int8_matmul"} & set(q.auto)
    # fp32 linears: glmc's kernels for an unquantized fp32 cpu build, else onnxruntime's MatMul
    assert (resolve(mode="none").fp32_matmul, resolve(mode="none").auto) == ("glmc", ("fp32_matmul",))
    for case in (dict(mode="none", kv_cache="fp16"), dict(mode="none", lora_slots=2),
                 dict(mode="none", target=get_backend(Target.parse("cuda")))):
        assert resolve(**case).fp32_matmul == "onnxruntime", case
    assert resolve(mode="int8", int8_matmul="dynamic").int8_matmul == "dynamic"      # what a user chose stays
    monkeypatch.setattr(linearq, "runnable", lambda threads=1: "glmc's quantized cpu kernels need AVX2")
    assert resolve(mode="int4").int4_matmul == "nbits"
