"""On a real GPU (the `device` tool's H100): a --target cuda artifact of small-glm against
transformers, and greedy tokens. Skipped, visibly, without a GPU; the kernel tests in
tests/backends/ run on the device by themselves when one is visible."""

from __future__ import annotations

import pytest
import torch

import glmc
from glmc.verify import compare

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible to torch")]


@pytest.fixture(scope="module")
def small_glm_cuda(tmp_path_factory):
    from glmc.backends.triton.aot import device_arch

    arch = device_arch()
    target = f"cuda:{arch}" if arch in ("sm_80", "sm_86", "sm_89", "sm_90") else "cuda"
    return glmc.compile("small-glm", tmp_path_factory.mktemp("gpu") / "small.glmc", target=target,
                        max_seq_len=256, verify=False)


def test_small_glm_cuda_matches_transformers(small_glm_cuda):
    from glmc.checkpoint import load

    model = load("small-glm").model
    rt = glmc.load(small_glm_cuda)
    result = compare(rt, model, "fp16", "none")       # fp16 tolerance: verify.TOLERANCES
    assert result.ok, result.as_dict()
    prompt = [5, 17, 300, 9, 4000]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, 5:]
    assert rt.generate([prompt], max_new_tokens=16, stop_at_eos=False)[0] == want.tolist()


def test_cuda_graph_decode_equals_eager_decode(small_glm_cuda, monkeypatch):
    with_graph = glmc.load(small_glm_cuda).generate([[5, 6, 7]], max_new_tokens=12, stop_at_eos=False)
    monkeypatch.setenv("GLMC_CUDA_GRAPH", "0")
    rt = glmc.load(small_glm_cuda)
    assert not rt.executor.use_cuda_graph
    assert rt.generate([[5, 6, 7]], max_new_tokens=12, stop_at_eos=False) == with_graph
