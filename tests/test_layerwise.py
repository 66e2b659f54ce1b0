"""Verification's layer-by-layer run of a CPU artifact (backends/cpu/layerwise.py) is the
artifact: the same logits with one depth's weights in memory at a time, and each depth
reproduces the next stream when fed the artifact's own."""

from __future__ import annotations

import pytest

import glmc


@pytest.mark.parametrize("variant,options", [("glm4-mqa", {}), ("glm-mha-tied", {"kv_cache": "fp16"}),
                                             ("glm-gqa", {"quant": "int8"}),
                                             ("glm-gqa", {"quant": "int8", "int8_matmul": "nbits"})])
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
        if kw.get("piece"):         # a SplitStep's onnxruntime piece (glmc kernels' linears): its step's
            return make(self, *a, **kw)
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive) + 1)
        s = make(self, *a, **kw)
        alive.append(weakref.ref(s))
        return s

    ex = CpuExecutor(art, rt.manifest)
    ex._make_session = counting.__get__(ex)
    got = ex.by_layer(ids, mask, steps)
    n_layers = rt.config["num_hidden_layers"]
    # embedding, layers, head: of step alone (it scores too), or of extend and score (declined)
    entries = 1 if ex.generation == "step" else 2
    assert len(alive) == entries * (n_layers + 2), len(alive)
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
