"""glmc.compile: checkpoint or preset -> verified NAME.glmc/ artifact.

  load (transformers eager model) -> trace prefill/decode (torch.export)
  -> pipeline (glmc/pipeline.py) -> backend.lower -> verify against the
  eager model -> swap the finished directory into place.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from glmc import __version__
from glmc.artifact import staging_dir, write_manifest
from glmc.backends import get_backend
from glmc.errors import GlmcError, VerificationError
from glmc.ir import PassContext
from glmc.pipeline import pipeline as default_pipeline
from glmc.pipeline import run_pipeline

DTYPES = ("fp32", "fp16", "bf16")
COMPILE_PEAK_OVER_WEIGHTS = 8.5   # measured on small-glm: 6.5x (3 entry points), 8.0x with --chunked-prefill
QUANTS = ("none", "int8", "int4")


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"glmc": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": sys.version.split()[0]}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_options(target: str, dtype: str, quant: str, group_size: int) -> None:
    if dtype not in DTYPES:
        raise GlmcError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if quant not in QUANTS:
        raise GlmcError(f"unknown quant {quant!r} (choose from {', '.join(QUANTS)})")
    get_backend(target)
    if target.split(":", 1)[0] == "cpu" and dtype != "fp32":
        raise GlmcError(f"--dtype {dtype} is not supported on the cpu target yet (cpu compiles fp32)")
    if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise GlmcError(f"--group-size must be a power of two >= 16 (e.g. 32, 64, 128), got {group_size!r}")


def default_output(model: str, quant: str) -> Path:
    name = Path(model).name if Path(model).is_dir() else model
    suffix = "" if quant == "none" else f"-{quant}"
    return Path(f"{name}{suffix}.glmc")


class _Stages:
    """A rich progress bar over compile stages (silent when not wanted)."""

    def __init__(self, show: bool, total: int):
        self.times: dict[str, float] = {}
        self._progress = None
        if show:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), TimeElapsedColumn(),
                                      transient=False, console=None)
            self._task = self._progress.add_task("compile", total=total)

    def __enter__(self):
        if self._progress:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress:
            self._progress.__exit__(*exc)

    def stage(self, name: str):
        stages = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()
                if stages._progress:
                    stages._progress.update(stages._task, description=name)

            def __exit__(self, *exc):
                stages.times[name] = round(time.perf_counter() - self.t0, 3)
                if stages._progress and exc[0] is None:
                    stages._progress.advance(stages._task)

        return _Stage()


def compile(
    model: str | os.PathLike,
    output: str | os.PathLike | None = None,
    target: str = "cpu",
    dtype: str | None = None,
    quant: str = "none",
    group_size: int = 128,
    max_seq_len: int | None = None,
    verify: bool = True,
    fuse: bool = True,
    progress: bool | None = None,
    passes: list | None = None,
    calibrate: int = 0,
    symmetric: bool = True,
    lm_head: str = "int8",
    accuracy_level: int = 4,
    embedding: str = "fp32",
    allow_pickle: bool = False,
    tune: bool = False,
    tune_budget: float = 120.0,
    chunked_prefill: bool | None = None,
) -> Path:
    """Compile MODEL (checkpoint directory or preset name); return the artifact path."""
    from glmc import checkpoint, trace

    if dtype is None:
        dtype = "fp32" if target.split(":", 1)[0] == "cpu" else "fp16"
    if chunked_prefill is None:
        # GPU targets lower the extend entry cheaply (JSON graph) and small chunks matter
        # there; on cpu its ONNX export nearly doubles compile time while one prefill call
        # measured faster than chunks (bench/results/chunk-cpu.json), so it is opt-in
        chunked_prefill = target.split(":", 1)[0] != "cpu"
    check_options(target, dtype, quant, group_size)
    if embedding not in ("fp32", "int8") or (embedding == "int8" and quant == "none"):
        raise GlmcError("--embedding int8 needs --quant int8 or int4 (choices: fp32, int8)")
    if lm_head not in ("int8", "none"):
        raise GlmcError(f"--lm-head must be int8 or none, got {lm_head!r}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise GlmcError(f"--accuracy-level must be 0..4, got {accuracy_level!r}")
    if not isinstance(calibrate, int) or calibrate < 0 or (calibrate and quant != "int4"):
        raise GlmcError("--calibrate N takes N >= 1 sequences and applies to --quant int4")
    out = Path(output) if output is not None else default_output(str(model), quant)
    if progress is None:
        progress = sys.stderr.isatty()
    t_start = time.perf_counter()
    with _Stages(progress, total=6 + bool(calibrate) + bool(tune)) as stages:
        with stages.stage("load checkpoint"):
            # compile peaks at up to ~8x the fp32 weights (report.json's peak_rss_over_fp32_weights
            # on small-glm); refuse up front what cannot fit
            loaded = checkpoint.load(model, allow_pickle=allow_pickle, bytes_per_param=4 * COMPILE_PEAK_OVER_WEIGHTS,
                                     purpose="compiling")
        cfg = loaded.config
        limit = cfg["max_position_embeddings"]
        seq = max_seq_len if max_seq_len is not None else min(limit, 2048)
        if not isinstance(seq, int) or not 2 <= seq <= limit:
            raise GlmcError(f"--max-seq-len must be in [2, {limit}] (the model's max_position_embeddings), got {seq}")
        ctx = PassContext(target=target, dtype=dtype, quant=quant, group_size=group_size, fuse=fuse,
                          max_seq_len=seq, symmetric=symmetric, lm_head=lm_head, accuracy_level=accuracy_level, embedding=embedding,
                          quant_cache={}, quant_report={}, model_config=cfg)   # shared by every entry point's copy of ctx
        pipeline = default_pipeline(ctx) if passes is None else passes
        if calibrate:
            with stages.stage("calibrate"):
                ctx.options["calibration_rows"] = _calibration_rows(loaded, cfg, ctx, calibrate, seq)
        with stages.stage("trace (torch.export)"):
            graphs = [trace.trace_prefill(loaded.model, cfg, seq), trace.trace_decode(loaded.model, cfg, seq)]
            if chunked_prefill:     # long prompts prefilled chunk by chunk over the cache
                graphs.append(trace.trace_extend(loaded.model, cfg, seq))
            if any(name == "last_token_logits" for name, _ in pipeline):
                # generation prefills for the last token only; logits() needs every position
                graphs.append(trace.trace_prefill(loaded.model, cfg, seq, name="score"))
        records = []
        with stages.stage("passes"):
            for g in graphs:
                g.gm, recs = run_pipeline(g.gm, ctx.for_entry(g.name), g.name, pipeline)
                records += recs
        backend = get_backend(target)
        with staging_dir(out) as tmp:
            with stages.stage(f"lower ({target})"):
                backend_info = backend.lower(graphs, tmp, ctx)
            if loaded.tokenizer_json:
                (tmp / "tokenizer.json").write_text(loaded.tokenizer_json)
            manifest = {
                "glmc_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": loaded.source,
                "model": {"model_type": loaded.model_type, "source_layout": loaded.source_layout, "config": cfg},
                "target": target, "dtype": dtype, "quant": quant,
                "group_size": group_size if quant == "int4" else None,
                "max_seq_len": seq,
                "passes": [r.as_dict() for r in records],
                "backend": backend_info,
                "versions": _versions(),
            }
            write_manifest(tmp, manifest)
            result = None
            with stages.stage("verify vs transformers"):
                no_device = _no_device_reason(target) if verify else None
                if no_device:
                    result = None
                elif verify:
                    result = _verify(tmp, loaded.model, graphs, ctx, pipeline, seq, cfg, dtype, quant)
            tuning = None
            if tune:
                with stages.stage("tune"):
                    from glmc.autotune import tune_artifact

                    tuning = tune_artifact(tmp, budget_s=tune_budget)
            with stages.stage("write artifact"):
                n_params = sum(p.numel() for p in loaded.model.parameters())
                quant_report = ctx.options.get("quant_report", {})
                report = {
                    "seconds": round(time.perf_counter() - t_start, 2),
                    "stage_seconds": stages.times,
                    "peak_rss_mb": round(_peak_rss_mb(), 1),
                    "parameters": n_params,
                    "parameter_bytes_fp32": n_params * 4,
                    "artifact_bytes": sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()),
                    "verify": result.as_dict() if result else (
                        f"skipped: {no_device}" if no_device else "skipped (--no-verify)"),
                    "quantization": _quant_summary(quant_report, quant, group_size, symmetric, lm_head,
                                                   accuracy_level, calibrate),
                    "passes": [r.as_dict(with_histograms=True) for r in records],
                    "warnings": loaded.warnings,
                    "tuning": tuning,
                }
                report["peak_rss_over_fp32_weights"] = round(report["peak_rss_mb"] * 2**20 / max(1, n_params * 4), 2)
                (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
                write_manifest(tmp, manifest)
    return out


def _no_device_reason(target: str) -> str | None:
    """Why a GPU artifact cannot be verified on this machine (None when it can)."""
    if target.split(":", 1)[0] == "cpu":
        return None
    import torch

    from glmc.backends.triton._common import interpreting

    if torch.cuda.is_available() or interpreting():
        return None
    return (f"no GPU on this machine to run the {target} kernels; run `glmc verify ARTIFACT` where the "
            f"GPU is (or set TRITON_INTERPRET=1 to verify in the interpreter)")


def _quant_summary(report: dict, quant, group_size, symmetric, lm_head, accuracy_level, calibrate) -> dict | None:
    if quant == "none":
        return None
    # the decoder blocks' linears (the lm_head is int8 whatever --quant says)
    blocks = {k: v for k, v in report.items() if v["bits"] != 8 or quant == "int8"}
    blocks_fp32 = sum(v["bytes_fp32"] for v in blocks.values())
    blocks_packed = sum(v["bytes_packed"] for v in blocks.values())
    fp32 = sum(v["bytes_fp32"] for v in report.values())
    packed = sum(v["bytes_packed"] for v in report.values())
    return {
        "quant": quant, "group_size": group_size if quant == "int4" else None,
        "symmetric": symmetric, "lm_head": lm_head, "accuracy_level": accuracy_level,
        "calibration_sequences": calibrate,
        "linear_bytes_fp32": fp32, "linear_bytes_fp16": fp32 // 2, "linear_bytes_packed": packed,
        "packed_over_fp16": round(packed / max(1, fp32 // 2), 4),
        "block_linear_bytes_fp16": blocks_fp32 // 2, "block_linear_bytes_packed": blocks_packed,
        "block_packed_over_fp16": round(blocks_packed / max(1, blocks_fp32 // 2), 4),
        "per_layer": report,
        "max_relative_error": max((v["relative_error"] for v in blocks.values()), default=0.0),
    }


def _calibration_rows(loaded, cfg, ctx, n_seqs: int, seq: int) -> dict:
    """Activation rows feeding every linear of the fused prefill graph, keyed by weight digest."""
    import torch

    from glmc.match import attr_tensor
    from glmc.passes.quantize_weights import _digest
    from glmc.trace import trace_prefill

    length = min(128, seq)
    codec = None
    src = loaded.source
    text_path = Path(src["name"]) / "calibration.txt" if src["kind"] == "checkpoint" else None
    if text_path is not None and text_path.is_file() and loaded.tokenizer_json:
        from glmc.tokenizer import TextCodec

        codec = TextCodec(loaded.tokenizer_json)
        ids = codec.encode(text_path.read_text())
        seqs = [ids[i * length:(i + 1) * length] for i in range(n_seqs) if len(ids) >= (i + 1) * length]
    else:  # no calibration text: random tokens still give per-channel activation magnitudes
        gen = torch.Generator().manual_seed(0)
        seqs = [torch.randint(3, cfg["vocab_size"], (length,), generator=gen).tolist() for _ in range(n_seqs)]
    if not seqs:
        raise GlmcError(f"{text_path}: too little calibration text for one {length}-token sequence")
    g = trace_prefill(loaded.model, cfg, seq, name="calibrate")
    stop = PassContext(ctx.target, ctx.dtype, ctx.quant, **dict(ctx.options, stop_before="quantize"))
    gm, _ = run_pipeline(g.gm, stop.for_entry("score"), "calibrate", default_pipeline(stop))
    rows: dict[str, list] = {}
    gm_ref = gm

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.op == "call_function" and n.target is torch.ops.aten.linear.default:
                w = attr_tensor(gm_ref, n.args[1])
                if w is not None:
                    x = self.env[n.args[0]].detach().reshape(-1, w.shape[1])
                    rows.setdefault(_digest(w), []).append(x[:: max(1, x.shape[0] // 64)])
            return result

    with torch.no_grad():
        for s in seqs:
            Recorder(gm).run(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.int64))
    return {k: torch.cat(v)[:512].float() for k, v in rows.items()}


def _verify(tmp: Path, model, graphs, ctx, pipeline, seq, cfg, dtype, quant):
    from glmc.runtime import Runtime
    from glmc.verify import compare

    runtime = Runtime(tmp, verify=False)
    result = compare(runtime, model, dtype, quant)
    if not result.ok:
        where = _diagnose(model, ctx, pipeline, seq, cfg, result.allowed)
        measured = (f"max abs logits diff {result.max_abs_diff:.3g}" if result.measure == "max_abs_diff"
                    else f"relative RMS logits error {result.relative_rms:.3g}")
        raise VerificationError(
            f"compiled model disagrees with transformers: {measured} > allowed {result.allowed:.3g} "
            f"({dtype}, quant {quant}); {where}; artifact not written (--no-verify skips this check)"
        )
    return result


def _diagnose(model, ctx, pipeline, seq, cfg, allowed) -> str:
    """Lower a prefill graph that also returns every hidden state; find where it first diverges."""
    import onnxruntime as ort
    import torch

    from glmc.backends.cpu.lower import export_onnx
    from glmc.trace import trace_prefill
    from glmc.verify import first_divergent_layer, fixed_prompts

    try:
        g = trace_prefill(model, cfg, seq, hidden_states=True)
        g.gm, _ = run_pipeline(g.gm, ctx.for_entry("score"), "prefill+hidden", pipeline)
        proto = export_onnx(g)
        with tempfile.TemporaryDirectory() as d:
            import onnx

            onnx.save_model(proto, f"{d}/debug.onnx", save_as_external_data=True)
            sess = ort.InferenceSession(f"{d}/debug.onnx", providers=["CPUExecutionProvider"])
            ids = fixed_prompts(cfg["vocab_size"], seq)[0]
            outs = sess.run(None, {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)})
        n_layers = cfg["num_hidden_layers"]
        ours = [o[0] for o in outs[1 + 2 * n_layers:]]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False).hidden_states
        layer, diff = first_divergent_layer(ours, [h[0].numpy() for h in ref], allowed)
    except Exception as e:  # diagnosis is best effort; the verification failure stands either way
        return f"could not localise the divergence ({type(e).__name__}: {e})"
    if layer is None:
        return "all decoder layers agree; the divergence is in the final norm or lm_head"
    if layer == 0:
        return f"the embeddings already differ (max diff {diff:.3g})"
    return f"first diverges at decoder layer {layer - 1} (hidden-state max diff {diff:.3g})"
