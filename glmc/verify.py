"""Check a compiled artifact against transformers' eager model.

Fixed prompts (a ragged batch, so padding is exercised) are prefilled and then
decoded for a few teacher-forced steps on both sides; the reference for step n
is transformers' forward over the prompt plus the n tokens so far, without a
cache. The measure is the max abs logits difference relative to the tolerance
for the artifact's dtype/quant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# (dtype, quant) -> (atol, rtol): |glmc - ref| <= atol + rtol * max|ref| on every logit,
# ref = transformers' unquantized eager model. fp32 differs only by summation order.
TOLERANCES = {
    ("fp32", "none"): (1e-4, 1e-4),
    # fp16 weights and activations (GPU targets): ~11-bit mantissa, rounding at every op
    # of every layer; softmax and accumulation stay fp32
    ("fp16", "none"): (2e-2, 2e-2),
    # bf16 keeps only 8 mantissa bits: 8x the fp16 rounding
    ("bf16", "none"): (1e-1, 1e-1),
}
# Quantized builds carry quantization noise, so they are gated on the relative RMS
# error of each position's logits, ||glmc - ref|| / ||ref - mean(ref)||, averaged over
# positions. A broken build (wrong packing or scales) scores ~1 or more; honest int4
# noise on flat random-weight logits stays well under these bounds. The compile
# report records the measured value and the top-1 agreement.
RELATIVE_RMS = {
    (dtype, quant): bound
    for dtype in ("fp32", "fp16", "bf16")
    for quant, bound in (("int8", 0.2), ("int4", 0.7))
}
DECODE_STEPS = 4


def tolerance(dtype: str, quant: str) -> tuple[float, float]:
    return TOLERANCES.get((dtype, quant), (float("inf"), 0.0))


def _rel_rms(got: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    got = got.reshape(-1, ref.shape[-1]).astype(np.float64)
    centred = ref - ref.mean(-1, keepdims=True)
    return float((np.linalg.norm(got - ref, axis=-1) / np.maximum(np.linalg.norm(centred, axis=-1), 1e-30)).mean())


def fixed_prompts(vocab_size: int, max_len: int) -> list[list[int]]:
    rng = np.random.default_rng(1234)
    lengths = [min(11, max_len - DECODE_STEPS - 1), min(4, max_len - DECODE_STEPS - 1)]
    low = 3 if vocab_size > 3 else 0
    return [rng.integers(low, vocab_size, n).tolist() for n in lengths]


@dataclass
class VerifyResult:
    max_abs_diff: float
    allowed: float
    ok: bool
    positions: int
    top1_agreement: float = 1.0
    max_abs_ref: float = 0.0
    relative_rms: float = 0.0
    measure: str = "max_abs_diff"

    def as_dict(self) -> dict:
        return {"measure": self.measure, "max_abs_diff": self.max_abs_diff, "relative_rms": self.relative_rms,
                "allowed": self.allowed, "ok": self.ok, "positions_checked": self.positions,
                "top1_agreement": self.top1_agreement, "max_abs_ref_logit": self.max_abs_ref}


@torch.no_grad()
def reference_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


@torch.no_grad()
def compare(runtime, model: torch.nn.Module, dtype: str, quant: str) -> VerifyResult:
    atol, rtol = tolerance(dtype, quant)
    prompts = fixed_prompts(runtime.vocab_size, runtime.max_seq_len)
    executor = runtime.executor
    full = runtime.logits(prompts)                       # every position (score entry)
    cache, last = runtime.prefill(prompts)              # the generation path (last token)
    worst, scale, checked, agree = 0.0, 0.0, 0, 0
    rel = []
    seqs = [list(p) for p in prompts]
    for b, p in enumerate(prompts):
        ref = reference_logits(model, p)
        worst = max(worst, float(np.abs(full[b] - ref).max()), float(np.abs(last[b] - ref[-1]).max()))
        scale = max(scale, float(np.abs(ref).max()))
        checked += len(p)
        agree += int((full[b].argmax(-1) == ref.argmax(-1)).sum())
        rel.append(_rel_rms(full[b], ref))
        seqs[b].append(int(ref[-1].argmax()))
    position = np.array([len(p) for p in prompts], np.int64)
    for _ in range(DECODE_STEPS):
        toks = np.array([[s[-1]] for s in seqs], np.int64)
        step = executor.decode(cache, toks, position)[:, 0]
        position += 1
        for b, s in enumerate(seqs):
            ref = reference_logits(model, s)[-1]
            worst = max(worst, float(np.abs(step[b] - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
            checked += 1
            agree += int(step[b].argmax() == ref.argmax())
            rel.append(_rel_rms(step[b], ref))
            s.append(int(ref.argmax()))
    rms = float(np.mean(rel))
    if (dtype, quant) in RELATIVE_RMS:
        allowed = RELATIVE_RMS[(dtype, quant)]
        return VerifyResult(worst, allowed, rms <= allowed, checked, round(agree / checked, 4), scale, rms,
                            "relative_rms")
    allowed = atol + rtol * scale
    return VerifyResult(worst, allowed, worst <= allowed, checked, round(agree / checked, 4), scale, rms)


def first_divergent_layer(hidden_glmc: list[np.ndarray], hidden_ref: list[np.ndarray], allowed: float):
    """Index and diff of the first hidden state beyond `allowed` (0 = embeddings, i = after layer i-1)."""
    for i, (a, b) in enumerate(zip(hidden_glmc, hidden_ref)):
        d = float(np.abs(a - b).max())
        if d > allowed:
            return i, d
    return None, 0.0
