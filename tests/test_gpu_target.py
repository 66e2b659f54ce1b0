"""--target cuda / rocm end to end. Without a GPU the artifact's kernels run in Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest), so the lowering
(op -> kernel mapping, weights in fp16, KV cache, decode) is checked against
transformers here; tests/gpu/ repeats it on a device when one is visible."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import glmc
from glmc.errors import GlmcError
from glmc.verify import compare
from tests.tolerances import TOLERANCES

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def cuda_artifact(artifacts):
    return artifacts("glm-gqa", target="cuda:sm_80,sm_90", chunked_prefill=True)


def test_cuda_fp16_artifact_matches_transformers(cuda_artifact, checkpoints, reference):
    manifest = json.loads((cuda_artifact / "manifest.json").read_text())
    assert manifest["dtype"] == "fp16" and manifest["backend"]["archs"] == ["sm_80", "sm_90"]
    hist = manifest["backend"]["op_histogram"]["decode"]
    assert hist["glmc.attention.default"] == 2 and hist["aten.linear.default"] >= 8
    rt = glmc.load(cuda_artifact)
    model = reference(checkpoints("glm-gqa"))
    result = compare(rt, model, "fp16", "none")      # fp16 tolerance: verify.TOLERANCES
    assert result.ok, result.as_dict()
    assert result.top1_agreement == 1.0
    prompt = [5, 6, 7, 8, 9]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, 5:]
    assert rt.generate([prompt], max_new_tokens=10, stop_at_eos=False)[0] == want.tolist()


def test_cuda_chunked_prefill_equals_one_call(cuda_artifact):
    prompts = [list(range(5, 45)), list(range(7, 12))]
    _, want = glmc.load(cuda_artifact, prefill_chunk=0).prefill(prompts)
    _, got = glmc.load(cuda_artifact, prefill_chunk=16).prefill(prompts)
    assert np.abs(got - want).max() < TOLERANCES["artifact_fp16"]


def test_cuda_artifact_stores_binaries_per_arch(cuda_artifact):
    index = json.loads((cuda_artifact / "kernels" / "index.json").read_text())
    assert set(index["archs"]) == {"sm_80", "sm_90"}
    per_arch = {a: {e["kernel"] for e in index["entries"] if e["arch"] == a} for a in index["archs"]}
    assert per_arch["sm_80"] == per_arch["sm_90"]
    assert {"_matmul_kernel", "_gemv_kernel", "_attention_kernel", "_rms_norm_kernel", "_rotary_kernel",
            "_swiglu_kernel"} <= per_arch["sm_90"]
    for e in index["entries"]:
        assert (cuda_artifact / "kernels" / e["binary"]).stat().st_size > 0
    assert (cuda_artifact / "kernels" / "src" / "matmul.py").is_file()


def test_rocm_int4_artifact(artifacts, checkpoints, reference):
    art = artifacts("glm4-mqa", target="rocm:gfx906", quant="int4", group_size=32)
    index = json.loads((art / "kernels" / "index.json").read_text())
    assert {e["arch"] for e in index["entries"]} == {"gfx906"}
    assert all(e["binary"].endswith(".hsaco") for e in index["entries"])
    hist = json.loads((art / "manifest.json").read_text())["backend"]["op_histogram"]["decode"]
    assert hist["glmc.linear_nbits.default"] >= 12
    result = compare(glmc.load(art), reference(checkpoints("glm4-mqa")), "fp16", "int4")
    assert result.ok, result.as_dict()


def test_decode_reuses_the_preallocated_cache(cuda_artifact):
    rt = glmc.load(cuda_artifact)
    a = rt.generate([[5, 6, 7]], max_new_tokens=4, stop_at_eos=False)
    cache = rt.executor.new_cache(1)
    b = rt.generate([[5, 6, 7]], max_new_tokens=4, stop_at_eos=False)
    assert a == b and rt.executor.new_cache(1) is cache
    assert cache.k[0].dtype == torch.float16 and cache.k[0].shape[2] == rt.max_seq_len


def test_graph_with_a_foreign_op_is_refused(cuda_artifact, tmp_path):
    import shutil

    art = tmp_path / "evil.glmc"
    shutil.copytree(cuda_artifact, art)
    path = art / "decode.graph.json"
    graph = json.loads(path.read_text())
    call = next(n for n in graph["nodes"] if n["op"] == "call")
    call["target"] = "builtins.eval.default"
    path.write_text(json.dumps(graph))
    with pytest.raises(GlmcError, match="only aten"):
        glmc.load(art, verify=False)


def test_artifact_kernel_source_is_never_imported(cuda_artifact, tmp_path):
    import shutil

    art = tmp_path / "src.glmc"
    shutil.copytree(cuda_artifact, art)
    marker = tmp_path / "executed"
    (art / "kernels" / "src" / "matmul.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    rt = glmc.load(art, verify=False)
    rt.generate([[5, 6]], max_new_tokens=2)
    assert not marker.exists()


def test_fp16_overflowing_weight_is_refused(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src = checkpoints("glm-gqa")
    bad = tmp_path / "big"
    import shutil

    shutil.copytree(src, bad)
    f = next(bad.glob("*.safetensors"))
    state = load_file(str(f))
    name = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[name][0, 0] = 1e6
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(GlmcError, match="beyond the fp16 range.*--dtype bf16"):
        glmc.compile(bad, tmp_path / "o.glmc", target="cuda", verify=False, max_seq_len=32)
    assert not (tmp_path / "o.glmc").exists()


def test_without_gpu_or_interpreter_a_clear_error(cuda_artifact):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the no-GPU message cannot be shown")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "glmc.cli", "run", str(cuda_artifact), "--ids", "5,6"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "needs a GPU" in r.stderr and "Traceback" not in r.stderr


def test_compile_for_gpu_without_device_records_owed_verification(checkpoints, tmp_path):
    """On a CPU-only host without the interpreter, compile still builds the artifact and says
    verification is owed (subprocess: the interpreter switch is fixed per process)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "g.glmc"
    r = subprocess.run([sys.executable, "-m", "glmc.cli", "compile", str(checkpoints("glm-gqa")), "--target",
                        "rocm:gfx942", "-o", str(out), "--max-seq-len", "32"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "not verified (skipped: no GPU" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["verify"].startswith("skipped: no GPU")
    assert np.all([p.suffix in (".hsaco", ".json") for p in (out / "kernels" / "gfx942").iterdir()])


def test_diagnosis_runs_the_gpu_programs_own_kernels(checkpoints, monkeypatch):
    """A wrong Triton kernel is localised in the program that has it: the GPU backend's
    hidden-state diagnosis runs its JSON program on its kernels (the cpu lowering of the
    same graph, which does not use them, sees nothing wrong)."""
    from glmc import checkpoint
    from glmc.backends import get_backend
    from glmc.backends.triton import swiglu
    from glmc.compiler import diagnose
    from glmc.ir import make_context
    from glmc.pipeline import pipeline

    loaded = checkpoint.load(checkpoints("glm-gqa"))
    model = loaded.model
    ctx = make_context("cuda:sm_90", "fp32", max_seq_len=32, model_config=loaded.config)
    passes = pipeline(ctx)
    real = swiglu.swiglu
    monkeypatch.setattr(swiglu, "swiglu", lambda gu, config=None: real(gu, config=config) * 1.5)
    where_gpu = diagnose(get_backend(ctx.target), model, ctx, passes, 1e-3)
    where_cpu = diagnose(get_backend("cpu"), model, ctx.with_(target=get_backend("cpu").target), passes, 1e-3)
    assert "first diverges at decoder layer 0" in where_gpu, where_gpu
    assert "all decoder layers agree" in where_cpu, where_cpu


def test_gpu_decode_profile_and_inspect_labels(cuda_artifact):
    from glmc.backends import get_backend
    from glmc.inspect import describe_artifact

    manifest = json.loads((cuda_artifact / "manifest.json").read_text())
    per_op = get_backend(manifest["target"]).profile_decode(cuda_artifact, manifest, context=8, steps=2)
    assert per_op["glmc.attention.default"] > 0 and per_op["aten.linear.default"] > 0
    text = describe_artifact(cuda_artifact)
    assert "decode.graph.json:" in text and ".onnx" not in text


def test_cuda_gelu_artifact_runs_geglu_on_the_gated_kernel(artifacts, checkpoints, reference):
    """The GeGLU fusion end to end on the GPU target (interpreter here): glmc.geglu in the
    graphs, the gated Triton kernel compiled ahead of time, logits within the fp16 bound."""
    art = artifacts("glm4-gelu-tanh", target="cuda:sm_90")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["backend"]["op_histogram"]["decode"]["glmc.geglu.default"] == 2
    index = json.loads((art / "kernels" / "index.json").read_text())
    gated = [e for e in index["entries"] if e["kernel"] == "_swiglu_kernel"]
    assert {e["constexprs"]["ACT"] for e in gated} == {2}          # tanh-approximated gelu
    result = compare(glmc.load(art), reference(checkpoints("glm4-gelu-tanh")), "fp16", "none")
    assert result.ok, result.as_dict()
