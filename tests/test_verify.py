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


def test_failed_compile_leaves_an_existing_artifact_untouched(tmp_path):
    out = glmc.compile("tiny-glm", tmp_path / "a.glmc", max_seq_len=32, chunked_prefill=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(VerificationError):
        glmc.compile("tiny-glm", out, max_seq_len=32, chunked_prefill=False,
                     passes=[*PIPELINE, ("corrupt", _corrupt_layer(0))])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.glmc"]


def test_no_verify_skips_the_check(tmp_path):
    out = glmc.compile("tiny-glm", tmp_path / "u.glmc", max_seq_len=32, verify=False, chunked_prefill=False,
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
