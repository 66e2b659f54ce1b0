"""`glmc compile` refuses to write an artifact that disagrees with the reference,
and says which layer first diverges."""

from __future__ import annotations

import pytest
import torch

import glmc
from glmc.errors import VerificationError
from glmc.ir import PassContext, PassResult, QuantConfig, make_context
from glmc.pipeline import pipeline

PIPELINE = pipeline(PassContext())


def _corrupt_layer(layer: int, op=torch.ops.aten.add.Tensor, arg: float | None = 0.05):
    """A deliberately wrong pass: shifts one layer's down_proj weight by 0.05 (a scale would
    be normalised away by glm4's post-MLP RMSNorm), or applies `op` with `arg`."""

    def corrupt(gm, ctx):
        hits = 0
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and node.target.endswith(f"layers.{layer}.mlp.down_proj.weight"):
                with gm.graph.inserting_after(node):
                    scaled = gm.graph.call_function(op, (node,) if arg is None else (node, arg))
                node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
                hits += 1
        gm.recompile()
        return PassResult(gm, hits)

    return corrupt


def test_wrong_graph_is_refused_and_the_layer_named(checkpoints, tmp_path):
    out = tmp_path / "bad.glmc"
    passes = [*PIPELINE, ("corrupt", _corrupt_layer(1))]
    with pytest.raises(VerificationError) as err:
        glmc.compile(checkpoints("glm4-mqa"), out, max_seq_len=32, passes=passes, chunked_prefill=False)
    msg = str(err.value)
    assert "max abs logits diff" in msg
    assert "first diverges at decoder layer 1" in msg
    assert not out.exists()
    assert not list(tmp_path.iterdir()), "no temporary directory may be left behind"


def test_failed_compile_leaves_an_existing_artifact_untouched(checkpoints, tmp_path):
    out = glmc.compile(checkpoints("glm-gqa"), tmp_path / "a.glmc", max_seq_len=32, chunked_prefill=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(VerificationError):
        glmc.compile(checkpoints("glm-gqa"), out, max_seq_len=32, chunked_prefill=False,
                     passes=[*PIPELINE, ("corrupt", _corrupt_layer(0))])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.glmc"]


def test_no_verify_skips_the_check(checkpoints, tmp_path):
    out = glmc.compile(checkpoints("glm-gqa"), tmp_path / "u.glmc", max_seq_len=32, verify=False, chunked_prefill=False,
                       passes=[*PIPELINE, ("corrupt", _corrupt_layer(0))])
    assert (out / "manifest.json").is_file()


def test_broken_quantized_build_is_refused(checkpoints, tmp_path):
    """Scrambled int4 codes (what a wrong packing order gives) must not pass as quantization noise."""

    def scramble(gm, ctx):
        hits = 0
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target.startswith("qweight"):
                t = getattr(gm, node.target)
                # swap nibbles (every code lands in the wrong slot); a new tensor, since the
                # packed weights are shared between entry points
                gm.register_buffer(node.target, ((t >> 4) | (t << 4)).clone())
                hits += 1
        return PassResult(gm, hits)

    ctx = make_context(quant=QuantConfig("int4"))
    with pytest.raises(VerificationError, match="relative RMS logits error"):
        glmc.compile(checkpoints("glm-gqa"), tmp_path / "q.glmc", max_seq_len=32, quant="int4", chunked_prefill=False,
                     passes=[*pipeline(ctx), ("scramble", scramble)])
    assert not (tmp_path / "q.glmc").exists()


def test_int4_build_with_one_wrong_layer_names_it(checkpoints, tmp_path):
    """Quantized builds are gated per layer (each run on transformers' own input), so the
    wrong layer is named, not the first layer int4 noise happens to push past a bound."""
    passes = pipeline(make_context(quant=QuantConfig("int4")))
    at = [name for name, _ in passes].index("quantize_weights")     # the weight is wrong, then quantized
    with pytest.raises(VerificationError) as err:
        glmc.compile(checkpoints("glm4-mqa"), tmp_path / "q.glmc", max_seq_len=32, quant="int4", chunked_prefill=False,
                     passes=[*passes[:at], ("corrupt", _corrupt_layer(2, torch.ops.aten.neg.default, None)), *passes[at:]])
    assert "first diverges at decoder layer 2" in str(err.value), str(err.value)


@pytest.mark.parametrize("variant,options", [("glm4-mqa", {}), ("glm-mha-tied", {"kv_cache": "fp16"}),
                                             ("glm-gqa", {"quant": "int8"})])
def test_layer_by_layer_run_is_the_artifact_one_layer_at_a_time(artifacts, variant, options):
    """Verification runs a CPU artifact cut at its layers (backends/cpu/layerwise.py): the
    cut graphs give the whole artifact's logits (every position, prefill, decode steps),
    and no two depths' sessions are alive at once."""
    import gc
    import weakref

    import numpy as np

    from glmc.backends.cpu.runtime import CpuExecutor
    from glmc.verify import continuation, fixed_prompts

    art = artifacts(variant, **options)
    rt = glmc.load(art)
    prompts = fixed_prompts(rt.vocab_size, rt.max_seq_len)
    cont = continuation(rt.vocab_size, prompts)
    ids, mask = rt._pad(prompts)
    steps = [np.array([c[n] for c in cont], np.int64) for n in range(len(cont[0]))]
    alive, most = [], [0]
    make = CpuExecutor._make_session

    def counting(self, *a, **kw):
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive) + 1)
        s = make(self, *a, **kw)
        alive.append(weakref.ref(s))
        return s

    ex = CpuExecutor(art, rt.manifest)
    ex._make_session = counting.__get__(ex)
    got = ex.by_layer(ids, mask, steps)
    n_layers = rt.config["num_hidden_layers"]
    assert len(alive) == 2 * (n_layers + 2), len(alive)     # extend and score: embedding, layers, head
    assert most[0] == 1
    full = rt.logits(prompts)
    cache, last = rt.prefill(prompts)
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(got["full"][b, :len(p)], full[b], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got["last"], last, atol=1e-5, rtol=1e-5)
    position = np.array([len(p) for p in prompts])
    for n, tok in enumerate(steps):
        step = rt.executor.decode(cache, tok[:, None], position + n)[:, 0]
        np.testing.assert_allclose(got["steps"][n], step, atol=1e-5, rtol=1e-5)
    assert sorted(got["stream"]) == list(range(n_layers + 1))     # the residual stream into every depth
    # each depth run on a given stream (verification gives transformers'): given the artifact's
    # own, it gives the artifact's next stream, and the last depth its logits
    again = ex.by_layer(ids, mask, steps, lambda depth: got["stream"][depth]["gen"])
    assert sorted(again["local"]) == list(range(n_layers + 1))
    for depth in range(n_layers):
        for kind, rows in again["local"][depth].items():
            for ours, chained in zip(rows, got["stream"][depth + 1][kind]):
                np.testing.assert_allclose(ours, chained, atol=1e-4, rtol=1e-4)
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(again["local"][n_layers]["full"][b], full[b], atol=1e-4, rtol=1e-4)
