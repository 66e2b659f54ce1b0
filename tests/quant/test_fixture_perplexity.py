"""Quantization quality on a model that has learned something: the trained fixture
tests/fixtures/glm-pystdlib (tools/train_fixture.py). The issue's targets: held-out
perplexity within 0.5% (int8) and 3% (int4-g128, RTN and calibrated) of fp32, and
calibration lowering the error against fp32 that it optimises.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import glmc
from glmc.tokenizer import codec_for

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "glm-pystdlib"


def _ppl(path, ids, chunk=128, n=8):
    """Held-out perplexity and the log-probabilities it came from."""
    model = glmc.load(path)
    chunks = [ids[i * chunk:(i + 1) * chunk] for i in range(n)]
    nll = count = 0
    logps = []
    for logits, c in zip(model.logits(chunks), chunks):
        z = logits[:-1].astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= lp[np.arange(len(c) - 1), c[1:]].sum()
        count += len(c) - 1
        logps.append(lp)
    return math.exp(nll / count), np.concatenate(logps)


@pytest.fixture(scope="module")
def fixture_ppl(tmp_path_factory):
    if not (FIXTURE / "model.safetensors").is_file():
        pytest.fail(f"trained fixture missing at {FIXTURE}: run tools/train_fixture.py")
    ids = codec_for("tokenizers", (FIXTURE / "tokenizer.json").read_bytes(), {}).encode((FIXTURE / "heldout.txt").read_text())
    root = tmp_path_factory.mktemp("fixture")
    out = {}
    for name, opts in {"fp32": {}, "int8": dict(quant="int8"), "int8-dynamic": dict(quant="int8", int8_matmul="dynamic"),
                       "int4": dict(quant="int4", group_size=128),
                       "int4-cal": dict(quant="int4", group_size=128, calibrate=8)}.items():
        # perplexity is the check here; compile-time verification is tested elsewhere
        out[name] = _ppl(glmc.compile(FIXTURE, root / f"{name}.glmc", max_seq_len=256, verify=False,
                                      chunked_prefill=False, **opts), ids)
    base = out["fp32"][1]
    # error against the fp32 model: mean KL(fp32 || quantized) per held-out token
    kl = {k: float((np.exp(base) * (base - v[1])).sum(-1).mean()) for k, v in out.items()}
    return {k: v[0] for k, v in out.items()}, kl


def test_fixture_has_learned_something(fixture_ppl):
    ppl, _ = fixture_ppl
    assert ppl["fp32"] < 100, ppl  # vocab 2048: a model that learned nothing scores ~2048


def test_fixture_int8_perplexity_within_half_a_percent(fixture_ppl):
    ppl, _ = fixture_ppl
    assert abs(ppl["int8"] / ppl["fp32"] - 1) < 0.005, ppl


def test_fixture_dynamic_int8_perplexity_within_half_a_percent(fixture_ppl):
    """--int8-matmul dynamic (one uint8 activation scale per call; bench/int8_forms_quality.py
    emulated +0.22%) keeps int8's bound; its coarser activations cost more than int8's."""
    ppl, kl = fixture_ppl
    assert abs(ppl["int8-dynamic"] / ppl["fp32"] - 1) < 0.005, ppl
    assert kl["int8"] < kl["int8-dynamic"], kl      # the activation rounding is really there


def test_fixture_int4_perplexity_within_three_percent(fixture_ppl):
    ppl, _ = fixture_ppl
    assert abs(ppl["int4"] / ppl["fp32"] - 1) < 0.03, ppl
    assert abs(ppl["int4-cal"] / ppl["fp32"] - 1) < 0.03, ppl


def test_calibration_reduces_the_error_against_fp32(fixture_ppl):
    _, kl = fixture_ppl
    assert kl["int8"] < kl["int4"], kl
    assert kl["int4-cal"] < kl["int4"], kl


