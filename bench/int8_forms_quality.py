"""What onnxruntime's batch-friendly int8 form would cost in quality, emulated in torch on the
trained fixture (tests/fixtures/glm-pystdlib): held-out perplexity, 8 chunks of 128 tokens.

    python bench/int8_forms_quality.py [--out bench/results/int8-forms-quality.json]

bench/matmul_rows.py found com.microsoft.DynamicQuantizeMatMul (int8 weights with one scale
per output column; activations quantized per call to uint8 with one scale per tensor) the
one onnxruntime form whose 16-row call is much cheaper than 16 one-row calls. Its numerics,
applied to every decoder linear of transformers' model (the lm_head stays fp32 in all rows):

  glmc int8 today      weights int8 per output column (symmetric; glmc stores the scale
                       once per block of MatMulNBits' layout), activations int8 per block of
                       128 per row (MatMulNBits, accuracy level 4)
  dynamic int8         the same weights, activations uint8 asymmetric with one scale and
                       zero point per call (the whole chunk: the coarsest case)
  per-column weights   the same weights, fp32 activations (what the weights alone cost)
  int8 g128 weights    weights int8 in groups of 128 along K with int8 activations per block:
                       what a group-wise int8 would add (for comparison)

An emulation of the arithmetic (rounding as the ops specify it), not an artifact: the
issue's gate for int8 is perplexity within 0.5% of fp32 on this fixture.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)

FIXTURE = ROOT / "tests" / "fixtures" / "glm-pystdlib"


def _pad(x, g: int):
    import torch

    k = x.shape[-1]
    return torch.nn.functional.pad(x, (0, -k % g)), k


def _symmetric(x, g: int | None):
    """int8 symmetric rounding of x's last axis, one scale per block of g (None: the whole axis)."""
    if g is None:
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        return (x / s).round().clamp(-127, 127) * s
    x, k = _pad(x, g)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
    s = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return ((blocks / s).round().clamp(-127, 127) * s).reshape(x.shape)[..., :k]


def _uint8_per_tensor(x):
    """DynamicQuantizeLinear: uint8, the range widened to include 0, one scale per tensor."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / 255 or 1.0
    zero = round(-lo / s)
    return ((x / s).round() + zero).clamp(0, 255).sub(zero) * s


FORMS = {
    "glmc int8 today (per-column weights, int8 activations per 128-block)":
        (lambda w: _symmetric(w, None), lambda x: _symmetric(x, 128)),
    "dynamic int8 (per-column weights, uint8 activations per tensor)":
        (lambda w: _symmetric(w, None), _uint8_per_tensor),
    "per-column int8 weights, fp32 activations": (lambda w: _symmetric(w, None), None),
    "int8 g128 weights, int8 activations per 128-block": (lambda w: _symmetric(w, 128), lambda x: _symmetric(x, 128)),
}


def _perplexity(model, chunks) -> float:
    import torch

    nll = count = 0.0
    with torch.no_grad():
        for c in chunks:
            logp = torch.log_softmax(model(torch.tensor([c])).logits[0, :-1].double(), -1)
            nll -= float(logp[torch.arange(len(c) - 1), torch.tensor(c[1:])].sum())
            count += len(c) - 1
    return math.exp(nll / count)


def _model(form=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    if form is None:
        return model
    weights, acts = form
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            with torch.no_grad():
                mod.weight.copy_(weights(mod.weight))
            if acts is not None:
                mod.register_forward_pre_hook(lambda _m, args, acts=acts: (acts(args[0]),))
    return model


def main(argv=None) -> int:
    import transformers

    from glmc.tokenizer import codec_for

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    codec = codec_for("tokenizers", (FIXTURE / "tokenizer.json").read_bytes(), {})
    ids = codec.encode((FIXTURE / "heldout.txt").read_text())
    chunks = [ids[i * 128:(i + 1) * 128] for i in range(8)]
    fp32 = _perplexity(_model(), chunks)
    results = {"fp32": {"perplexity": fp32}}
    for name, form in FORMS.items():
        p = _perplexity(_model(form), chunks)
        results[name] = {"perplexity": p, "vs_fp32_percent": (p / fp32 - 1) * 100}
    emit({"what": "held-out perplexity of the trained fixture with int8 forms emulated on its decoder linears",
          "fixture": str(FIXTURE.relative_to(ROOT)), "chunks": "8 x 128 tokens of heldout.txt",
          "versions": {"transformers": transformers.__version__}, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
