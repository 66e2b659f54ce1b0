"""Quantized artifacts against the unquantized model, on each layout, and on the trained fixture.

Thresholds: random-weight checkpoints have flat logits (near-ties everywhere), so
agreement is measured teacher-forced (same input sequence on both sides, argmax per
position): int8 >= 90%, int4 >= 40% of positions (chance is ~0.2%; a broken packing
gives ~0). Quality proper is judged on the trained fixture below. On the trained fixture the issue's
targets apply: held-out perplexity within 0.5% (int8) and 3% (int4-g128) of fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import glmc
from glmc.tokenizer import TextCodec

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "glm-pystdlib"
SEQS = [[5, 17, 42, 99, 3, 250, 8, 61, 7, 300, 4, 11, 12, 13, 14, 15, 16, 200, 201, 202],
        [33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44]]


def _agreement(model, ref):
    agree = total = 0
    for s in SEQS:
        got = model.logits(s).argmax(-1)
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([s])).logits[0].argmax(-1).numpy()
        agree += int((got == want).sum())
        total += len(s)
    return agree / total


@pytest.mark.parametrize("variant", ["glm-gqa", "glm4-mqa", "chatglm"])
@pytest.mark.parametrize("quant, threshold", [("int8", 0.9), ("int4", 0.4)])
def test_quantized_agrees_with_unquantized(variant, quant, threshold, artifacts, checkpoints, reference):
    path = artifacts(variant, quant=quant)
    model = glmc.load(path)
    assert _agreement(model, reference(checkpoints(variant))) >= threshold
    fp32 = artifacts(variant)
    assert (path / "weights.safetensors").stat().st_size < (fp32 / "weights.safetensors").stat().st_size
    q = json.loads((path / "report.json").read_text())["quantization"]
    assert q["linear_bytes_packed"] < 0.3 * q["linear_bytes_fp32"], q  # packed, scales and zero points included
    assert model.manifest["quant"] == quant
    assert len(model.generate([[5, 6, 7]], max_new_tokens=8)[0]) >= 1


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
    ids = TextCodec((FIXTURE / "tokenizer.json").read_text()).encode((FIXTURE / "heldout.txt").read_text())
    root = tmp_path_factory.mktemp("fixture")
    out = {}
    for name, opts in {"fp32": {}, "int8": dict(quant="int8"), "int4": dict(quant="int4", group_size=128),
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


def test_fixture_int4_perplexity_within_three_percent(fixture_ppl):
    ppl, _ = fixture_ppl
    assert abs(ppl["int4"] / ppl["fp32"] - 1) < 0.03, ppl
    assert abs(ppl["int4-cal"] / ppl["fp32"] - 1) < 0.03, ppl


def test_calibration_reduces_the_error_against_fp32(fixture_ppl):
    _, kl = fixture_ppl
    assert kl["int8"] < kl["int4"], kl
    assert kl["int4-cal"] < kl["int4"], kl


def test_int8_embedding_option(artifacts, checkpoints, reference):
    fp = artifacts("glm-gqa", quant="int8")
    path = artifacts("glm-gqa", quant="int8", embedding="int8")
    model = glmc.load(path)
    assert _agreement(model, reference(checkpoints("glm-gqa"))) >= 0.9
    assert (path / "weights.safetensors").stat().st_size < (fp / "weights.safetensors").stat().st_size
    hist = json.loads((path / "manifest.json").read_text())["backend"]["op_histogram"]["decode"]
    assert "Gather" in hist
