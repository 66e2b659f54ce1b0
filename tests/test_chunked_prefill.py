"""Long prompts prefilled in chunks (prefill, then the extend entry over the cache) give
the same logits and tokens as one prefill call, and as transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import glmc
from glmc.errors import GlmcError
from tests.tolerances import TOLERANCES

# ragged batch: one row ends inside a later chunk, one in the first, one exactly on a boundary
PROMPTS = [list(range(5, 75)), list(range(9, 14)), list(range(200, 232))]


@pytest.mark.parametrize("variant", ["glm-gqa", "glm4-mqa"])
@pytest.mark.parametrize("chunk,extends", [
    (16, [16, 16, 16, 6]), (3, [3] * 21 + [4]), (2, [2] * 34),
    (23, [23, 24]),                    # 70 = 3 x 23 + 1: the one-token tail folds into the last chunk
])
def test_chunked_equals_one_call_and_transformers(artifacts, checkpoints, reference, variant, chunk, extends):
    art = artifacts(variant, chunked_prefill=True)
    whole = glmc.load(art, prefill_chunk=0)
    chunked = glmc.load(art, prefill_chunk=chunk)
    calls = []
    extend = chunked.executor.extend
    chunked.executor.extend = lambda *a: (calls.append(a[1].shape[1]), extend(*a))[1]
    _, want = whole.prefill(PROMPTS)
    _, got = chunked.prefill(PROMPTS)
    assert calls == extends
    assert np.abs(got - want).max() < TOLERANCES["artifact_consistency_fp32"]
    model = reference(checkpoints(variant))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1].numpy()
    assert np.abs(got[0] - ref).max() < TOLERANCES["artifact_fp32"]
    assert whole.generate(PROMPTS, 6, stop_at_eos=False) == chunked.generate(PROMPTS, 6, stop_at_eos=False)


def test_chunk_comes_from_tuning_json(artifacts, tmp_path):
    import json
    import shutil

    art = tmp_path / "a.glmc"
    shutil.copytree(artifacts("glm-gqa", chunked_prefill=True), art)
    (art / "tuning.json").write_text(json.dumps({"version": 1, "prefill_chunk": 32, "threads": 1}))
    rt = glmc.load(art, verify=False)
    assert rt.prefill_chunk == 32 and rt.executor.threads == 1
    assert glmc.load(art, verify=False, prefill_chunk=0).prefill_chunk is None


def test_bad_chunk_is_a_clear_error(artifacts):
    with pytest.raises(GlmcError, match="prefill_chunk must be an integer >= 0"):
        glmc.load(artifacts("glm-gqa", chunked_prefill=True), prefill_chunk=-3)


def test_cpu_artifacts_always_chunk_through_their_one_entry(artifacts):
    """A cpu artifact's generation entry is the step graph (format 3 on; extend where the lean
    lowering declines), with or without --chunked-prefill: an explicit chunk is honoured and
    gives the tokens of one call."""
    art = artifacts("glm-gqa")                                    # compiled --no-chunked-prefill
    assert set(glmc.load(art).manifest["backend"]["graphs"]) == {"step"}      # it scores too (format 4)
    rt = glmc.load(art, prefill_chunk=16)
    assert rt.prefill_chunk == 16
    prompt = [list(range(5, 45))]
    assert rt.generate(prompt, 4, stop_at_eos=False) == glmc.load(art).generate(prompt, 4, stop_at_eos=False)
