"""pytest-benchmark suite: glmc against transformers eager, end to end and per step.

Kept out of the normal test run (tests/ is the test path). Run:

    python -m pytest bench/bench_e2e.py --benchmark-json=bench/results/bench-e2e.json
    GLMC_BENCH_MODEL=small-glm python -m pytest bench/bench_e2e.py ...   (the README's model)

Correctness is checked before timing (greedy tokens equal eager's); each timed call
is one prefill or one decode step, warmed up; extra_info records tokens/s and the
fraction of the machine's measured bandwidth / matmul peak.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import glmc
from glmc.benchmark import EagerProvider, GlmcProvider
from glmc.checkpoint import load as load_model
from glmc.measure import matmul_tflops, read_bandwidth_gbs
from glmc.settings import bench_model

MODEL = bench_model()
PROMPT = 128
CONTEXT = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    loaded = load_model(MODEL)
    art = glmc.compile(MODEL, tmp_path_factory.mktemp("b") / "m.glmc", max_seq_len=512)
    machine = {"bandwidth_gbs": read_bandwidth_gbs(), "matmul_tflops": matmul_tflops()}
    providers = {"glmc": GlmcProvider(art), "eager": EagerProvider(loaded.model)}
    ids = np.random.default_rng(0).integers(3, loaded.config["vocab_size"], PROMPT).tolist()
    want = providers["eager"].greedy(ids[:16], 6)
    for name, p in providers.items():
        assert p.greedy(ids[:16], 6) == want, name
    n_params = sum(p.numel() for p in loaded.model.parameters())
    emb = loaded.model.get_input_embeddings().weight.numel()
    return providers, ids, machine, n_params, emb


@pytest.mark.parametrize("provider", ["glmc", "eager"])
def test_prefill(benchmark, setup, provider):
    providers, ids, machine, n_params, emb = setup
    p = providers[provider]
    benchmark.pedantic(p.prefill, args=(ids,), rounds=5, warmup_rounds=1)
    s = benchmark.stats.stats.median
    tflops = 2 * (n_params - emb) * PROMPT / s / 1e12
    benchmark.extra_info.update(tokens_per_s=PROMPT / s, tflops=tflops,
                                peak_fraction=tflops / machine["matmul_tflops"])


@pytest.mark.parametrize("provider", ["glmc", "eager"])
def test_decode_step(benchmark, setup, provider):
    providers, ids, machine, n_params, emb = setup
    p = providers[provider]
    if provider == "glmc":
        rt = p.rt
        cache, last = rt.prefill([ids[:CONTEXT]])
        pos = np.array([CONTEXT])

        def step():
            rt.executor.decode(cache, np.array([[5]]), pos)   # same slot each time: fixed context
    else:
        from transformers import DynamicCache

        model = p.model
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids[:CONTEXT]]), past_key_values=cache, use_cache=True)

        def step():
            with torch.no_grad():
                model(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True)
                cache.crop(-1)                                  # drop the new token: fixed context
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    s = benchmark.stats.stats.median
    gbs = 4 * (n_params - emb) / s / 1e9
    benchmark.extra_info.update(tokens_per_s=1 / s, gbs=gbs, roofline_fraction=gbs / machine["bandwidth_gbs"])
