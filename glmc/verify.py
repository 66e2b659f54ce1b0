"""Check a compiled artifact against transformers' eager model.

Fixed prompts (a ragged batch, so padding is exercised) are prefilled and then
decoded for a few teacher-forced steps (fixed continuation tokens) on both sides;
the reference is transformers' own modules run over prompt + continuation
without a cache, one decoder layer in memory at a time (`Reference`). A CPU
artifact runs one depth at a time too (backends/cpu/layerwise.py), chained (its
own logits) and each depth on the reference's hidden state (its own error).
Unquantized builds are gated on the max abs logits difference (TOLERANCES);
quantized ones on each depth's own error (LAYER_RELATIVE), since N layers of
honest rounding noise compound with depth; both name the first depth beyond
its bound when they fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
# Each depth run on transformers' own input (cpu artifacts): its error relative to what it
# changes (see layer_errors). fp32 differs by summation order (~1e-6 measured); quantized
# builds by their weights' rounding (measured on random-weight checkpoints: see README); a
# wrong weight, scale or packing gives ~1. Also names the first depth beyond it.
LAYER_RELATIVE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 1e-1, "int8": 0.1, "int4": 0.5}
DECODE_STEPS = 4
# --kv-cache fp16: K/V are rounded once each to fp16 (relative error <= 2^-11 ~ 4.9e-4),
# everything else is computed in fp32 (tiny-glm measured 1.4e-4 max |logits diff|)
KV_FP16 = (2e-3, 2e-3)


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
    layer_errors: dict = field(default_factory=dict)    # depth -> its own error (see layer_errors)
    where: str | None = None                             # the first depth beyond its bound

    def as_dict(self) -> dict:
        return {"measure": self.measure, "max_abs_diff": self.max_abs_diff, "relative_rms": self.relative_rms,
                "allowed": self.allowed, "ok": self.ok, "positions_checked": self.positions,
                "top1_agreement": self.top1_agreement, "max_abs_ref_logit": self.max_abs_ref,
                "layer_errors": {str(d): float(f"{e:.3g}") for d, e in self.layer_errors.items()}}


class Reference:
    """transformers' own modules (embedding, decoder layers, final norm, lm_head) over the
    checkpoint's tensors, one decoder layer in memory at a time: verification costs one
    layer of fp32 weights, not the model. A model already in memory (a preset) is used as is.

    model: transformers' model (weights in it, or uninitialised with `tensors` to read them
    from: glmc.checkpoint.TensorSource)."""

    def __init__(self, model: torch.nn.Module, tensors=None):
        self.model = model
        self.tensors = tensors
        self.config = model.config.to_dict()
        self.materialized = tensors is None

    @classmethod
    def of(cls, x) -> "Reference":
        """x: a Reference, a transformers model, or a glmc.checkpoint.LoadedModel."""
        if isinstance(x, Reference):
            return x
        if isinstance(x, torch.nn.Module):
            return cls(x)
        return cls(x.model, None if x.weights_in_model else x.tensors)

    def _module(self, module: torch.nn.Module, prefix: str, *init) -> torch.nn.Module:
        """module itself (weights in memory), or a fresh one of its class holding the checkpoint's
        tensors under prefix (the model's own, uninitialised, stays untouched)."""
        if self.materialized:
            return module
        with torch.device("meta"):
            fresh = type(module)(*init)
        fresh.load_state_dict(self.tensors.state(prefix), strict=True, assign=True)
        return fresh.eval()

    def _embed(self, ids: list[int]) -> torch.Tensor:
        if self.materialized:
            return self.model.model.embed_tokens(torch.tensor([ids]))
        name = "model.embed_tokens.weight"
        return torch.stack([self.tensors.read(name, i, i + 1)[0].float() for i in ids])[None]

    def _lm_head(self, h: torch.Tensor) -> torch.Tensor:
        if self.materialized:
            return self.model.lm_head(h)
        name, V = "lm_head.weight", self.config["vocab_size"]
        step = max(1, (1 << 24) // h.shape[-1])
        return torch.cat([h @ self.tensors.read(name, r, min(V, r + step)).float().T for r in range(0, V, step)], -1)

    @torch.no_grad()
    def run(self, seqs: list[list[int]], stream: bool = False) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
        """(logits (T, V) per sequence, hidden states per sequence as transformers' output_hidden_states
        lists them: embeddings, after each layer but the last, final-normed last). stream: the
        last layer's output too, before the final norm: entry d is then the residual stream
        into depth d (0 embeddings, d after layer d-1, n_layers the final norm's input)."""
        inner = self.model.model
        hs = [self._embed(ids).float() for ids in seqs]
        hidden = [[h[0].numpy().copy()] for h in hs]
        pos = [torch.arange(len(ids))[None] for ids in seqs]
        rope = [inner.rotary_emb(h, p) for h, p in zip(hs, pos)]
        masks = [_causal(len(ids)) for ids in seqs]
        n_layers = self.config["num_hidden_layers"]
        for i in range(n_layers):
            layer = self._module(inner.layers[i], f"model.layers.{i}.", self.model.config, i)
            for b in range(len(seqs)):
                out = layer(hs[b], attention_mask=masks[b], position_ids=pos[b], position_embeddings=rope[b])
                hs[b] = out[0] if isinstance(out, tuple) else out
                if i < n_layers - 1 or stream:
                    hidden[b].append(hs[b][0].numpy().copy())
            del layer
        norm = self._module(inner.norm, "model.norm.", self.config["hidden_size"], self.config["rms_norm_eps"])
        logits = []
        for b in range(len(seqs)):
            h = norm(hs[b])
            hidden[b].append(h[0].numpy().copy())
            logits.append(self._lm_head(h)[0].float().numpy())
        return logits, hidden


def _causal(T: int) -> torch.Tensor:
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.zeros(T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def continuation(vocab_size: int, prompts: list[list[int]]) -> list[list[int]]:
    """The fixed tokens fed to the teacher-forced decode steps (one list per prompt)."""
    rng = np.random.default_rng(4321)
    low = 3 if vocab_size > 3 else 0
    return [rng.integers(low, vocab_size, DECODE_STEPS).tolist() for _ in prompts]


@torch.no_grad()
def compare(runtime, reference, dtype: str, quant: str) -> VerifyResult:
    """Prefill (every position, and the generation path's last token) and DECODE_STEPS
    teacher-forced decode steps of the artifact vs the reference's logits over prompt +
    continuation, computed in one layer-by-layer pass.

    An executor that runs the workload one layer at a time (cpu: `by_layer`) holds one
    layer of the artifact at a time too, and runs each layer on the reference's own input
    as well: `layer_errors` then says how far each depth is from transformers on its own,
    which is the gate for quantized builds (the noise of N layers compounds; a wrong layer
    stands out), and where a failed build first diverges."""
    atol, rtol = tolerance(dtype, quant)
    if runtime.manifest.get("backend", {}).get("kv_cache") == "fp16":
        atol, rtol = max(atol, KV_FP16[0]), max(rtol, KV_FP16[1])
    prompts = fixed_prompts(runtime.vocab_size, runtime.max_seq_len)
    cont = continuation(runtime.vocab_size, prompts)
    refs, hidden = Reference.of(reference).run([p + c for p, c in zip(prompts, cont)], stream=True)
    executor = runtime.executor
    got = None
    if hasattr(executor, "by_layer"):
        ids, mask = runtime._pad(prompts)
        steps = [np.array([c[n] for c in cont], np.int64) for n in range(DECODE_STEPS)]
        got = executor.by_layer(ids, mask, steps, lambda depth: [h[depth] for h in hidden])
    if got is not None:
        full, last, decoded = [got["full"][b, :len(p)] for b, p in enumerate(prompts)], got["last"], got["steps"]
    else:
        full = runtime.logits(prompts)                       # every position (score entry)
        executor.release_scoring()     # one entry's weights in memory at a time: cpu drops its score session
        cache, last = runtime.prefill(prompts)              # the generation path (last token)
        position = np.array([len(p) for p in prompts], np.int64)
        decoded = []
        for n in range(DECODE_STEPS):
            decoded.append(executor.decode(cache, np.array([[c[n]] for c in cont], np.int64), position + n)[:, 0].copy())
    worst, scale, checked, agree = 0.0, 0.0, 0, 0
    rel = []
    for b, p in enumerate(prompts):
        ref = refs[b][:len(p)]
        worst = max(worst, float(np.abs(full[b] - ref).max()), float(np.abs(last[b] - ref[-1]).max()))
        scale = max(scale, float(np.abs(ref).max()))
        checked += len(p)
        agree += int((full[b].argmax(-1) == ref.argmax(-1)).sum())
        rel.append(_rel_rms(full[b], ref))
        for n, step in enumerate(decoded):
            ref = refs[b][len(p) + n]
            worst = max(worst, float(np.abs(step[b] - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
            checked += 1
            agree += int(step[b].argmax() == ref.argmax())
            rel.append(_rel_rms(step[b], ref))
    rms = float(np.mean(rel))
    n_layers = runtime.config["num_hidden_layers"]
    layers = layer_errors(got, hidden, refs, n_layers) if got is not None else {}
    common = dict(positions=checked, top1_agreement=round(agree / checked, 4), max_abs_ref=scale,
                  relative_rms=rms, layer_errors=layers)
    if (dtype, quant) in RELATIVE_RMS:
        if set(layers) == set(range(-1, n_layers + 1)):   # every depth on the reference's own input
            bound = LAYER_RELATIVE[quant]
            return VerifyResult(worst, bound, max(layers.values()) <= bound, measure="layer_relative_error",
                                where=_first_over(layers, bound), **common)
        allowed = RELATIVE_RMS[(dtype, quant)]
        return VerifyResult(worst, allowed, rms <= allowed, measure="relative_rms", **common)
    allowed = atol + rtol * scale
    return VerifyResult(worst, allowed, worst <= allowed, where=_first_over(layers, LAYER_RELATIVE[dtype]), **common)


def summary(v: dict) -> str:
    """One phrase for a VerifyResult's as_dict(): what was measured against what was allowed."""
    op = "<=" if v["ok"] else ">"
    if v["measure"] == "max_abs_diff":
        return f"max abs logits diff {v['max_abs_diff']:.2e} {op} {v['allowed']:.2e}"
    if v["measure"] == "relative_rms":
        return f"relative RMS logits error vs fp32 {v['relative_rms']:.3f} {op} {v['allowed']}"
    layers = {int(d): e for d, e in v["layer_errors"].items()}
    depth = max(layers, key=layers.get)
    return (f"each layer's own error vs fp32 {op} {v['allowed']} (worst {layers[depth]:.3f}, "
            f"{depth_name(depth, max(layers))}); end to end relative RMS logits error {v['relative_rms']:.3f}")


def layer_errors(got: dict, hidden: list, refs: list, n_layers: int) -> dict[int, float]:
    """depth -> how far that depth alone is from transformers, on the reference's input,
    averaged over every checked position: -1 the embeddings (||e - e_ref|| / ||e_ref||);
    a decoder layer, its change to the residual stream (||h - h_ref|| / ||h_ref - h_in||);
    n_layers the final norm and lm_head (relative RMS logits error). Depths the executor
    could not isolate are left out."""
    out = {}
    if 0 in got["stream"]:
        out[-1] = float(np.mean([_row_rel(e, h[0][:len(e)], 0.0) for kind in got["stream"][0].values()
                                 for e, h in zip(kind, hidden)]))
    for depth, kinds in got["local"].items():
        if depth == n_layers:
            out[depth] = float(np.mean([_rel_rms(x, r[:len(x)]) for x, r in zip(kinds["full"], refs)]))
            continue
        out[depth] = float(np.mean([_row_rel(x, h[depth + 1][:len(x)], h[depth][:len(x)])
                                    for kind in kinds.values() for x, h in zip(kind, hidden)]))
    return dict(sorted(out.items()))


def _row_rel(got: np.ndarray, ref: np.ndarray, base) -> float:
    """Mean over rows of ||got - ref|| / ||ref - base||."""
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    change = np.linalg.norm(ref - base, axis=-1)
    return float((np.linalg.norm(got - ref, axis=-1) / np.maximum(change, 1e-30)).mean())


def _first_over(layers: dict[int, float], bound: float) -> str | None:
    for depth, err in layers.items():
        if err > bound:
            return depth_name(depth, max(layers)) + f" (its own error {err:.3g} > {bound:.3g} on transformers' input)"
    return None


def depth_name(depth: int, n_layers: int) -> str:
    if depth < 0:
        return "the embeddings"
    if depth >= n_layers:
        return "the final norm / lm_head"
    return f"decoder layer {depth}"


def first_divergent_layer(hidden_glmc: list[np.ndarray], hidden_ref: list[np.ndarray], allowed: float):
    """Index and diff of the first hidden state beyond `allowed` (0 = embeddings, i = after layer i-1)."""
    for i, (a, b) in enumerate(zip(hidden_glmc, hidden_ref)):
        d = float(np.abs(a - b).max())
        if d > allowed:
            return i, d
    return None, 0.0
