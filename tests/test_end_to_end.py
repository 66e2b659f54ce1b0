"""The acceptance bar: compiled fp32 CPU artifacts against transformers' eager model.

Tolerance: TOLERANCES["artifact_fp32"] (1e-4) max abs on logits (fp32 both sides; the difference is
accumulation order in onnxruntime's kernels, measured ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import glmc
from tests.conftest import VARIANTS
from tests.tolerances import TOLERANCES

ATOL = TOLERANCES["artifact_fp32"]
PROMPTS = [[5, 17, 42, 99, 3, 250, 8, 61, 7], [300, 4], [11, 12, 13, 14, 15]]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_every_decode_step_match_transformers(variant, artifacts, checkpoints, reference):
    assert_matches_transformers(glmc.load(artifacts(variant)), reference(checkpoints(variant)),
                                lambda got, want: np.testing.assert_allclose(got, want, rtol=0, atol=ATOL))


def assert_matches_transformers(model, ref, close, prompts=PROMPTS, steps: int = 12) -> None:
    """close(got, want) on every position of a ragged batch, generation's prefill and `steps`
    decode steps (each fed transformers' greedy token) against transformers' logits."""
    full = model.logits(prompts)                    # every position, ragged batch
    cache, last = model.prefill(prompts)           # generation's prefill: last token per row
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for b, p in enumerate(prompts):
            want = ref(input_ids=torch.tensor([p])).logits[0].numpy()
            close(full[b], want)
            close(last[b], want[-1])
            seqs[b].append(int(want[-1].argmax()))
        position = np.array([len(p) for p in prompts])
        for _ in range(steps):
            step = model.executor.decode(cache, np.array([[s[-1]] for s in seqs]), position)[:, 0]
            position += 1
            for b, s in enumerate(seqs):
                want = ref(input_ids=torch.tensor([s])).logits[0, -1].numpy()
                close(step[b], want)
                s.append(int(want.argmax()))


def _hf_greedy(ref, ids, n):
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=n, do_sample=False, eos_token_id=1, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_32_tokens_equal_transformers_generate(variant, artifacts, checkpoints, reference):
    model = glmc.load(artifacts(variant))
    ref = reference(checkpoints(variant))
    for ids in PROMPTS:
        got = model.generate([ids], max_new_tokens=32)[0]
        assert got == _hf_greedy(ref, ids, 32)
        assert len(got) == 32 or got[-1] == 1  # ran the full length unless it hit EOS


@pytest.mark.parametrize("variant", ["glm-gqa", "glm4-mqa"])
def test_batched_generation_equals_one_by_one(variant, artifacts):
    model = glmc.load(artifacts(variant))
    batched = model.generate(PROMPTS, max_new_tokens=20)
    alone = [model.generate([p], max_new_tokens=20)[0] for p in PROMPTS]
    assert batched == alone
    assert len({len(p) for p in PROMPTS}) > 1


def test_logits_api_matches_prefill(artifacts, checkpoints, reference):
    model = glmc.load(artifacts("glm-gqa"))
    ref = reference(checkpoints("glm-gqa"))
    got = model.logits(PROMPTS[0])
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([PROMPTS[0]])).logits[0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    batch = model.logits(PROMPTS)
    assert [b.shape[0] for b in batch] == [len(p) for p in PROMPTS]


def test_stream_yields_the_generate_tokens(artifacts):
    model = glmc.load(artifacts("tiny-glm"))
    streamed = [t.id for t in model.stream([5, 6, 7], max_new_tokens=10)]
    assert streamed == model.generate([[5, 6, 7]], max_new_tokens=10)[0]
    texts = [t.text for t in model.stream("Hi there", max_new_tokens=5)]
    assert len(texts) == 5


def test_sampling_is_reproducible_for_a_seed(artifacts):
    model = glmc.load(artifacts("tiny-glm"))
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9)
    a = model.generate([[5, 6, 7]], seed=3, **kw)
    assert a == model.generate([[5, 6, 7]], seed=3, **kw)
    others = [model.generate([[5, 6, 7]], seed=s, **kw) for s in (4, 5, 6)]
    assert any(o != a for o in others)


def test_decode_is_incremental_not_a_rerun_of_the_prompt(artifacts, monkeypatch):
    model = glmc.load(artifacts("tiny-glm"))
    calls = {"prefill": 0, "decode": 0}
    for name in calls:
        fn = getattr(model.executor, name)

        def counted(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(model.executor, name, counted)
    model.generate([[5, 6, 7]], max_new_tokens=16, stop_at_eos=False)
    assert calls == {"prefill": 1, "decode": 15}


def test_steps_run_the_lean_graph_on_one_binding(artifacts, monkeypatch):
    """cpu: one step session runs the prompt and every decode step. Its graph is lean (one
    GroupQueryAttention per layer over the in-place cache, no shape arithmetic); the prompt
    runs its right padding as tokens (every row's last slot is T-1); each step says per row
    which slot it writes (the row's length so far) and reuses the binding made on the first
    step. Its logits are checked against transformers by
    test_prefill_and_every_decode_step_match_transformers."""
    import onnx

    art = artifacts("tiny-glm")
    model = glmc.load(art)
    ex = model.executor
    assert ex.generation == "step"
    hist = model.manifest["backend"]["op_histogram"]["step"]
    L = model.config["num_hidden_layers"]
    assert hist["com.microsoft::GroupQueryAttention"] == L
    assert not {"Shape", "Slice", "Concat", "Transpose", "Expand", "Where"} & set(hist), hist
    graph = onnx.load(str(art / "step.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input][:4] == ["input_ids", "seqlens_k", "total_sequence_length", "last_rows"]
    seen, bindings = [], []
    prompt_call, run = ex._step_call, ex.sessions["step"].run_with_iobinding

    def spy_prompt(kv, ids, last_slot, rows, adapter_slot):
        seen.append(("prompt", ids.shape, list(last_slot), list(rows)))
        return prompt_call(kv, ids, last_slot, rows, adapter_slot)

    def spy_run(binding, *a):
        bindings.append(binding)
        return run(binding, *a)

    monkeypatch.setattr(ex, "_step_call", spy_prompt)
    monkeypatch.setattr(ex.sessions["step"], "run_with_iobinding", spy_run)
    model.generate([[5, 6, 7], [8, 9]], max_new_tokens=5, stop_at_eos=False)
    assert seen == [("prompt", (2, 3), [2, 2], [2, 4])]      # rows' last real tokens: 0*3+2, 1*3+1
    assert len(bindings) == 1 + 4 and len({id(b) for b in bindings[1:]}) == 1   # one decode binding
    assert set(ex.sessions.keys()) == {"step"}      # one session: one pre-packed copy of the weights


def test_lean_step_graph_matches_the_exported_extend_graph(artifacts, checkpoints, tmp_path):
    """The lean step graph and torch.onnx's export of the same fused graph (kept for what the
    lean lowering declines) give the same tokens and logits within 1e-4, for a right-padded
    batch, decode steps of rows at different lengths, and a prompt prefilled in chunks."""
    import glmc.backends.cpu.lower as lower

    lean = glmc.load(artifacts("tiny-glm"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lower, "build_step", lambda *a, **k: (None, "switched off by the test", []))
        art = glmc.compile("tiny-glm", tmp_path / "extend.glmc", verify=False,
                           max_seq_len=lean.manifest["max_seq_len"])
    exported = glmc.load(art)
    assert exported.executor.generation == "extend" and lean.executor.generation == "step"
    assert exported.manifest["backend"]["step_declined"] == "switched off by the test"
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    for rt in (lean, exported):
        rt.prefill_chunk = None
    assert lean.generate(prompts, 6, stop_at_eos=False) == exported.generate(prompts, 6, stop_at_eos=False)
    caches = []
    for rt in (lean, exported):
        cache, last = rt.prefill(prompts)
        pos = np.array([len(p) for p in prompts])
        steps = [last]
        for n in range(3):
            steps.append(rt.executor.decode(cache, np.array([[20 + n]] * 3), pos + n)[:, 0].copy())
        caches.append(steps)
    for a, b in zip(*caches):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    for rt in (lean, exported):       # chunks of 3: rows end in different chunks
        rt.prefill_chunk = 3
    chunked = [rt.prefill(prompts)[1] for rt in (lean, exported)]
    np.testing.assert_allclose(chunked[0], chunked[1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(chunked[0], caches[0][0], atol=1e-4, rtol=0)


def test_fp32_step_graphs_on_either_kernel_add_no_zero_bias(artifacts, checkpoints, tmp_path, reference, monkeypatch):
    """fp32 builds on glmc's kernels (--fp32-matmul glmc; auto from FP32_KERNELS_MIN_BYTES of
    linears up, so not these small models): every linear one Linear16 node (the packed
    [gate | up] one included), no MatMul, matching transformers. auto on a model with a linear
    they cannot take (glm4-mqa's vocabulary of 515, not a multiple of 8) gets the MatMul step.
    On MatMul the packed [gate | up] projection is two MatMuls over its halves (no Split).
    Either keeps a bias that holds anything (the variants' random QKV biases: one Add per
    layer) and adds none where the bias is all zeros, as transformers initialises it; a GeLU
    MLP with zero biases is checked on both (the glm-gelu variants' rotary width keeps them off
    the step graph). All within ATOL of transformers."""
    import glmc.backends.cpu.lower as lower
    from tests.conftest import VARIANTS, make_hf_model

    close = lambda got, want: np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)   # noqa: E731
    L = VARIANTS["glm-gqa"]["num_hidden_layers"]
    rt = glmc.load(artifacts("glm-gqa", fp32_matmul="glmc"))
    hist = rt.manifest["backend"]["op_histogram"]["step"]
    assert "MatMul" not in hist and hist["glmc.cpu::Linear16"] == 4 * L + 1 and hist["Add"] == L, hist
    assert_matches_transformers(rt, reference(checkpoints("glm-gqa")), close, steps=4)
    for variant in ("glm-gqa", "glm4-mqa"):                         # the default here: MatMul
        L = VARIANTS[variant]["num_hidden_layers"]
        rt = glmc.load(artifacts(variant))
        hist = rt.manifest["backend"]["op_histogram"]["step"]
        assert "Split" not in hist and hist["MatMul"] == 5 * L + 1 and hist["Add"] == L, (variant, hist)
    monkeypatch.setattr(lower, "FP32_KERNELS_MIN_BYTES", 0)
    art = glmc.compile(checkpoints("glm4-mqa"), tmp_path / "mqa.glmc", verify=False, max_seq_len=64)
    assert "glmc.cpu::Linear16" not in glmc.load(art).manifest["backend"]["op_histogram"]["step"]
    model = make_hf_model(dict(VARIANTS["glm-gqa"], hidden_act="gelu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    model.save_pretrained(tmp_path / "zero-bias")
    for kernels in ("glmc", "onnxruntime"):
        art = glmc.compile(tmp_path / "zero-bias", tmp_path / f"zero-bias-{kernels}.glmc", verify=False,
                           max_seq_len=64, fp32_matmul=kernels)
        rt = glmc.load(art)
        hist = rt.manifest["backend"]["op_histogram"]["step"]
        assert "Add" not in hist and ("Split" not in hist or kernels == "glmc"), (kernels, hist)
        assert ("glmc.cpu::Linear16" in hist) == (kernels == "glmc"), (kernels, hist)
        assert_matches_transformers(rt, reference(tmp_path / "zero-bias"), close, steps=4)


def test_fp16_kv_cache_halves_the_cache_and_matches_transformers(tmp_path, checkpoints, reference):
    """--kv-cache fp16 (cpu): the graph's cache inputs are fp16 (cast to fp32 after the slice of
    the slots in use), the runtime's buffers are half the size, and prefill + every teacher-forced
    decode step still match transformers within verify.KV_FP16 (compile's own verification)."""
    import onnx

    from glmc.verify import KV_FP16, compare

    ckpt = checkpoints("glm-gqa")
    art = glmc.compile(ckpt, tmp_path / "kv16.glmc", max_seq_len=64, kv_cache="fp16", verify=False)
    graph = onnx.load(str(art / "extend.onnx"), load_external_data=False).graph
    past = [i for i in graph.input if i.name.startswith("past_")]
    assert past and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in past)
    rt = glmc.load(art)
    cache = rt.executor.new_cache(1)
    assert cache.k[0].dtype == np.float16 and cache.k[0].nbytes * 2 == np.zeros(cache.k[0].shape, np.float32).nbytes
    d = compare(rt, reference(ckpt), "fp32", "none").as_dict()
    assert d["ok"], d
    assert d["allowed"] <= KV_FP16[0] + KV_FP16[1] * d["max_abs_ref_logit"] + 1e-12, d   # no looser than KV_FP16
    assert d["max_abs_diff"] > 1e-5, d      # the rounding is really there (an fp32 cache differs by ~1e-6)
