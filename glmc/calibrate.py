"""Calibration rows for activation-aware int4 quantization: the activations feeding every
linear of the fused prefill graph, keyed by the weight's digest (glmc.quant.digest), which
is how quantize_weights looks them up in ctx.calibration."""

from __future__ import annotations

from pathlib import Path

import torch

from glmc.errors import GlmcError
from glmc.ir import PassContext
from glmc.match import attr_tensor
from glmc.quant import digest

LENGTH = 128            # tokens per calibration sequence
ROWS_PER_CALL = 64      # activation rows kept per linear per sequence
MAX_ROWS = 512


def calibration_sequences(loaded, n_seqs: int, length: int) -> list[list[int]]:
    """The checkpoint's calibration.txt tokenized into `length`-token sequences, else
    seeded random tokens (they still give per-channel activation magnitudes)."""
    src = loaded.source
    text_path = Path(src["name"]) / "calibration.txt" if src["kind"] == "checkpoint" else None
    if text_path is not None and text_path.is_file() and loaded.text is not None and loaded.text.files:
        from glmc.tokenizer import codec_for

        text = loaded.text
        ids = codec_for(text.kind, next(iter(text.files.values())), text.specials).encode(text_path.read_text())
        seqs = [ids[i * length:(i + 1) * length] for i in range(n_seqs) if len(ids) >= (i + 1) * length]
        if not seqs:
            raise GlmcError(f"{text_path}: too little calibration text for one {length}-token sequence")
        return seqs
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, loaded.config["vocab_size"], (length,), generator=gen).tolist() for _ in range(n_seqs)]


def calibration_rows(loaded, ctx: PassContext, n_seqs: int) -> dict[str, torch.Tensor]:
    """weight digest -> (rows, K) fp32 activations, from the prefill graph fused up to quantization."""
    from glmc.pipeline import run_pipeline
    from glmc.trace import trace_prefill

    seqs = calibration_sequences(loaded, n_seqs, min(LENGTH, ctx.max_seq_len))
    g = trace_prefill(loaded.model, loaded.config, ctx.max_seq_len, name="calibrate")
    gm, _ = run_pipeline(g.gm, ctx.with_(entry="score", stop_before="quantize"), "calibrate")
    rows: dict[str, list] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.op == "call_function" and n.target is torch.ops.aten.linear.default:
                w = attr_tensor(gm, n.args[1])
                if w is not None:
                    x = self.env[n.args[0]].detach().reshape(-1, w.shape[1])
                    rows.setdefault(digest(w), []).append(x[:: max(1, x.shape[0] // ROWS_PER_CALL)])
            return result

    with torch.no_grad():
        for s in seqs:
            Recorder(gm).run(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.int64))
    return {k: torch.cat(v)[:MAX_ROWS].float() for k, v in rows.items()}
