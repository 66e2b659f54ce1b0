"""glmc.compile: checkpoint or preset -> verified NAME.glmc/ artifact.

  load (transformers eager model) -> [calibrate] -> trace the entry points
  (torch.export) -> pipeline (glmc/pipeline.py) -> Backend.lower -> verify
  against the eager model through the backend's executor -> [tune] -> swap
  the finished directory into place. The target only chooses the Backend.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from glmc import __version__
from glmc.artifact import staging_dir, write_manifest
from glmc.backends import get_backend
from glmc.dtypes import COMPUTE as DTYPES
from glmc.errors import GlmcError, VerificationError
from glmc.ir import QuantConfig, make_context
from glmc.measure import peak_rss_mb
from glmc.pipeline import pipeline as default_pipeline
from glmc.pipeline import run_pipeline
from glmc.target import Target
from glmc.verify import Reference
from glmc.weights import CHUNK_ELEMENTS, WeightBook

# --calibrate holds the fp32 model: measured on small-glm, 6.5x the fp32 weights (3 entry points)
CALIBRATED_PEAK_OVER_WEIGHTS = 8.5
BASE_COMPILE_BYTES = 0.6 * 2**30
# verification holds one depth of the artifact at a time: its mapped pages and onnxruntime's
# pre-packed copy of them
VERIFY_OVER_SEGMENT = 2.0
QUANTS = ("none", "int8", "int4")
log = logging.getLogger(__name__)


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"glmc": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": sys.version.split()[0]}


def check_options(backend, dtype: str, q: QuantConfig, calibrate: int) -> None:
    """Refuse option combinations up front, each with one line naming the problem."""
    if dtype not in DTYPES:
        raise GlmcError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if dtype not in backend.dtypes:
        raise GlmcError(f"--dtype {dtype} is not supported on the {backend.target.kind} target yet "
                        f"(it compiles {', '.join(backend.dtypes)})")
    if q.mode not in QUANTS:
        raise GlmcError(f"unknown quant {q.mode!r} (choose from {', '.join(QUANTS)})")
    if backend.target.family == "cpu" and dtype != "fp32":
        if q.mode != "none":
            raise GlmcError(f"--dtype {dtype} on the cpu target stores unquantized linears in 16 bits; "
                            f"--quant {q.mode} builds run with --dtype fp32")
        from glmc.backends.cpu.linear16 import available

        why = available()
        if why:
            raise GlmcError(f"--dtype {dtype} on the cpu target {why}")
    gs = q.group_size
    if not isinstance(gs, int) or isinstance(gs, bool) or gs < 16 or gs & (gs - 1):
        raise GlmcError(f"--group-size must be a power of two >= 16 (e.g. 32, 64, 128), got {gs!r}")
    if q.embedding not in ("fp32", "int8") or (q.embedding == "int8" and q.mode == "none"):
        raise GlmcError("--embedding int8 needs --quant int8 or int4 (choices: fp32, int8)")
    if q.lm_head not in ("int8", "int4", "none"):
        raise GlmcError(f"--lm-head must be int8, int4 or none, got {q.lm_head!r}")
    if q.kv_cache not in ("fp32", "fp16"):
        raise GlmcError(f"--kv-cache must be fp32 or fp16, got {q.kv_cache!r}")
    if q.kv_cache != "fp32" and backend.target.family != "cpu":
        raise GlmcError(f"--kv-cache {q.kv_cache} is a cpu option; GPU targets keep the cache in the compute dtype")
    if q.accuracy_level not in (0, 1, 2, 3, 4):
        raise GlmcError(f"--accuracy-level must be 0..4, got {q.accuracy_level!r}")
    if q.int8_matmul not in ("auto", "nbits", "dynamic", "glmc"):
        raise GlmcError(f"--int8-matmul must be auto, nbits, dynamic or glmc, got {q.int8_matmul!r}")
    if q.int8_matmul == "dynamic":
        if backend.target.family != "cpu":
            raise GlmcError("--int8-matmul dynamic is a cpu option (onnxruntime's DynamicQuantizeMatMul)")
        if q.mode == "none":
            raise GlmcError("--int8-matmul dynamic needs int8 linears: --quant int8 (or an int8 lm_head)")
        if q.kv_cache != "fp32":
            raise GlmcError("--int8-matmul dynamic needs the lean step graph, which --kv-cache fp16 does not use")
    if q.int4_matmul not in ("auto", "nbits", "glmc"):
        raise GlmcError(f"--int4-matmul must be auto, nbits or glmc, got {q.int4_matmul!r}")
    for bits, value in ((4, q.int4_matmul), (8, q.int8_matmul)):
        why = _why_not_glmc_kernels(backend, q, bits) if value == "glmc" else None
        if why:
            raise GlmcError(why)
    if q.fp32_matmul not in ("auto", "onnxruntime", "glmc"):
        raise GlmcError(f"--fp32-matmul must be auto, onnxruntime or glmc, got {q.fp32_matmul!r}")
    why = _why_not_glmc_fp32(backend, dtype, q) if q.fp32_matmul == "glmc" else None
    if why:
        raise GlmcError(why)
    if not isinstance(calibrate, int) or calibrate < 0 or (calibrate and q.mode != "int4"):
        raise GlmcError("--calibrate N takes N >= 1 sequences and applies to --quant int4")


def resolve_matmuls(backend, q: QuantConfig, lora_slots: int, dtype: str = "fp32") -> QuantConfig:
    """q with --int4-matmul / --int8-matmul auto chosen: glmc's kernels (backends/cpu/linearq.py)
    where this build can run them, else nbits (MatMulNBits). On small-glm (2 threads, one run,
    the builds alternating: bench/results/matmul-default-small-glm-cpu.json) they decode int4
    1.26-1.62x and int8 1.28-1.43x faster than MatMulNBits and prefill 1.10-1.36x / 1.26-1.37x
    faster (medians); on the GLM-4-9B shape int4 decode read 75-82% of the bandwidth probe
    against MatMulNBits' 49-63% (bench/results/glm4-9b-cpu-int4-linearq-tasks.json).
    --fp32-matmul auto: glmc's fp32 kernels (backends/cpu/linear16.py) for an unquantized fp32
    build where they run, else onnxruntime's MatMul (`_why_not_glmc_fp32`)."""
    fields = [f for f in ("int4_matmul", "int8_matmul", "fp32_matmul") if getattr(q, f) == "auto"]
    if not fields:
        return q
    choice = {}
    for f in fields:
        other, runs = ("onnxruntime", "onnxruntime's MatMul") if f == "fp32_matmul" else ("nbits", "MatMulNBits")
        why = (f"--lora-slots runs {runs}" if lora_slots else
               _why_not_glmc_fp32(backend, dtype, q) if f == "fp32_matmul" else
               _why_not_glmc_kernels(backend, q, {"int4_matmul": 4, "int8_matmul": 8}[f]))
        if why:
            log.info("%s auto: %s (%s)", f, runs, why)
        choice[f] = other if why else "glmc"
    return replace(q, **choice, auto=tuple(f for f in fields if choice[f] == "glmc"))


def _why_not_glmc_fp32(backend, dtype: str, q: QuantConfig) -> str | None:
    """Why this build's fp32 linears cannot run on glmc's kernels (backends/cpu/linear16.py with
    fp32 weights), as the error an explicit --fp32-matmul glmc gets, or None."""
    if backend.target.family != "cpu":
        return "--fp32-matmul glmc is a cpu option (glmc's kernels for the CPU)"
    if dtype != "fp32" or q.mode != "none":
        return "--fp32-matmul glmc runs the linears of an unquantized --dtype fp32 build"
    if q.kv_cache != "fp32":
        return "--fp32-matmul glmc needs the lean step graph, which --kv-cache fp16 does not use"
    from glmc.backends.cpu.linear16 import available

    why = available()
    return f"--fp32-matmul glmc {why}" if why else None


def _why_not_glmc_kernels(backend, q: QuantConfig, bits: int) -> str | None:
    """Why this build's int`bits` linears cannot run on glmc's quantized kernels
    (backends/cpu/linearq.py), as the error an explicit --int{bits}-matmul glmc gets, or None."""
    option = f"--int{bits}-matmul"
    if backend.target.family != "cpu":
        return f"{option} glmc is a cpu option (glmc's quantized kernels for the CPU)"
    if bits == 4 and q.mode != "int4":
        return "--int4-matmul glmc needs --quant int4"
    if bits == 8 and q.mode == "none":
        return "--int8-matmul glmc needs int8 linears: --quant int8 (or an int8 lm_head)"
    if bits == 4 and not q.symmetric:
        return "--int4-matmul glmc runs symmetric int4; drop --asym (or use --int4-matmul nbits)"
    if bits == 4 and q.group_size % 32:
        return f"--int4-matmul glmc needs a group size that is a multiple of 32, got {q.group_size}"
    if q.kv_cache != "fp32":
        return f"{option} glmc needs the lean step graph, which --kv-cache fp16 does not use"
    if q.accuracy_level != 4:
        return (f"{option} glmc computes with int8 activations (accuracy level 4); "
                f"--accuracy-level {q.accuracy_level} needs {option} nbits")
    from glmc.backends.cpu.linear16 import available
    from glmc.backends.cpu.linearq import runnable

    why = available()
    if why:
        return f"{option} glmc {why}"
    why = runnable()
    return f"{option} glmc: {why}" if why else None


def check_lora_slots(backend, slots, rank, calibrate: int, kv_cache: str) -> None:
    for name, v in (("--lora-slots", slots), ("--lora-rank", rank)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (name == "--lora-rank" and v < 1):
            raise GlmcError(f"{name} must be a {'non-negative' if name == '--lora-slots' else 'positive'} "
                            f"integer, got {v!r}")
    if not slots:
        return
    if slots > 64:
        raise GlmcError(f"--lora-slots {slots}: at most 64 run-time adapter slots")
    if backend.target.family != "cpu":
        raise GlmcError("--lora-slots is built for the cpu target only; merge adapters with --lora for "
                        f"{backend.target.kind}")
    if calibrate:
        raise GlmcError("--lora-slots cannot be combined with --calibrate (calibrated weights are not rows of "
                        "the checkpoint's tensors)")
    if kv_cache != "fp32":
        raise GlmcError("--lora-slots needs the lean step graph, which --kv-cache fp16 does not use")


def stored_rows(loaded, linears: list) -> dict:
    """Where each checkpoint tensor packed into an adapter linear is stored: glm name ->
    [stored tensor name, first stored row, rows read per head (chatglm's per-head qkv)], the
    names an adapter's modules are keyed by."""
    out = {}
    for lin in linears:
        for name, _, _ in lin["parts"]:
            _, stored, start, _, _ = loaded.tensors.entries[name]
            out[name] = [stored, int(start), bool(loaded.per_head_qkv and ".query_key_value." in stored)]
    return out


def default_output(model: str, quant: str) -> Path:
    name = Path(model).name if Path(model).is_dir() else model
    suffix = "" if quant == "none" else f"-{quant}"
    return Path(f"{name}{suffix}.glmc")


class _Stages:
    """A rich progress bar over compile stages (silent when not wanted)."""

    def __init__(self, show: bool, total: int):
        self.times: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}      # the process's peak RSS when each stage ended
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
                stages.peak_rss_mb[name] = round(peak_rss_mb(), 1)
                if stages._progress and exc[0] is None:
                    stages._progress.advance(stages._task)

        return _Stage()


def compile(
    model: str | os.PathLike,
    output: str | os.PathLike | None = None,
    target: str | Target = "cpu",
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
    embedding: str | None = None,
    kv_cache: str = "fp32",
    allow_pickle: bool = False,
    tune: bool = False,
    tune_budget: float = 120.0,
    chunked_prefill: bool | None = None,
    rope_ratio_as: str | None = None,
    lora: Sequence = (),
    lora_slots: int = 0,
    lora_rank: int = 16,
    int8_matmul: str = "auto",
    int4_matmul: str = "auto",
    fp32_matmul: str = "auto",
) -> Path:
    """Compile MODEL (checkpoint directory or preset name); return the artifact path.

    The stages, in order: load -> [calibrate] -> trace -> passes -> lower (the target's
    backend) -> verify (through that backend's executor) -> [tune] -> write.

    lora: PEFT LoRA adapter directories, each a path or (path, scale), merged into the
    weights as they are read (verification then checks against the merged model).
    lora_slots / lora_rank: the decoder linears take run-time adapters (Runtime.add_adapter)
    of rank <= lora_rank in that many slots, beside the (possibly quantized) base weights.
    int4_matmul / int8_matmul: how the cpu step graph runs int4 / int8 linears. "glmc": glmc's
    TVM kernels (backends/cpu/linearq.py; int8: every int8 linear, the lm_head too), the same
    int8-activation arithmetic as MatMulNBits at accuracy level 4, run between onnxruntime
    pieces of the step graph. "nbits": onnxruntime's MatMulNBits. int8 also takes "dynamic":
    DynamicQuantizeMatMul for the decoder linears over the same per-column codes (one uint8
    activation scale per call, shared by a batch's rows; onnxruntime's integer GEMM: the
    fastest prefill on AVX2 CPUs), the lm_head on MatMulNBits. "auto" (the default): glmc
    where this build and this CPU can run it, else nbits (`resolve_matmuls`).
    fp32_matmul: how the cpu step graph of an unquantized fp32 build runs its linears. "glmc":
    glmc's TVM kernels over the weights in their block layout (backends/cpu/linear16.py), read in
    place from the artifact; "onnxruntime": its MatMul, over a pre-packed copy. "auto" (the
    default): glmc where this build can run it and the linears are large enough to gain
    (backends/cpu/lower.py: FP32_KERNELS_MIN_BYTES).
    """
    from glmc import checkpoint
    from glmc.calibrate import calibration_rows

    target = Target.parse(target)
    backend = get_backend(target)
    dtype = dtype or backend.default_dtype
    if chunked_prefill is None:
        chunked_prefill = backend.chunked_prefill_default
    if embedding is None:       # compact tables by default when quantizing (big vocabularies); the GPU
        # programs' int8 gather returns fp32 rows into an fp16 program, so GPUs keep the table
        embedding = "int8" if quant != "none" and backend.target.family == "cpu" else "fp32"
    qc = QuantConfig(quant, group_size, symmetric, lm_head, embedding, accuracy_level, kv_cache, int8_matmul,
                     int4_matmul, fp32_matmul)
    check_options(backend, dtype, qc, calibrate)
    check_lora_slots(backend, lora_slots, lora_rank, calibrate, kv_cache)
    qc = resolve_matmuls(backend, qc, lora_slots, dtype)
    adapters = read_adapters(lora, allow_pickle)
    if tune and backend.why_cannot_run_here():
        raise GlmcError(f"--tune: {backend.why_cannot_run_here()}; compile without --tune and run `glmc tune` there")
    out = Path(output) if output is not None else default_output(str(model), quant)
    if progress is None:
        progress = sys.stderr.isatty()
    t_start = time.perf_counter()
    with _Stages(progress, total=6 + bool(calibrate) + bool(tune)) as stages:
        with stages.stage("load checkpoint"):
            if calibrate:       # calibration runs the model: it needs the weights in memory
                loaded = checkpoint.load(model, allow_pickle=allow_pickle, rope_ratio_as=rope_ratio_as, adapters=adapters,
                                         bytes_per_param=4 * CALIBRATED_PEAK_OVER_WEIGHTS, purpose="compiling")
            else:               # weights stay in the checkpoint until they are written
                loaded = checkpoint.open_model(model, allow_pickle=allow_pickle, purpose="compiling",
                                               rope_ratio_as=rope_ratio_as, adapters=adapters,
                                               need_bytes=lambda c: compile_memory_bytes(c, qc, verify))
            book = _weight_book(loaded, eager=bool(calibrate))
        cfg = loaded.config
        limit = cfg["max_position_embeddings"]
        seq = max_seq_len if max_seq_len is not None else min(limit, 2048)
        if not isinstance(seq, int) or not 2 <= seq <= limit:
            raise GlmcError(f"--max-seq-len must be in [2, {limit}] (the model's max_position_embeddings), got {seq}")
        ctx = make_context(target, dtype, qc, seq, fuse=fuse, model_config=cfg, weights=book,
                           lora_slots=(lora_slots, lora_rank) if lora_slots else None)
        pipeline = default_pipeline(ctx) if passes is None else passes
        if calibrate:
            with stages.stage("calibrate"):
                ctx = ctx.with_(calibration=calibration_rows(loaded, ctx, calibrate))
        with stages.stage("trace (torch.export)"):
            graphs = trace_entries(loaded.model, ctx, pipeline, chunked_prefill)
        with stages.stage("passes"):
            records = run_passes(graphs, ctx, pipeline)
        quant_report: dict = {}
        for r in records:
            quant_report.update(r.report.get("quantization", {}))
        with staging_dir(out) as tmp:
            with stages.stage(f"lower ({target})"):
                backend_info = backend.lower(graphs, tmp, ctx, late_entries(loaded.model, ctx, pipeline, records))
                ran = backend_info.get("linearq", {})      # what a default choice of glmc's kernels got
                fell = [f for f, kind in (("int4_matmul", "Linear4"), ("int8_matmul", "Linear8"))
                        if f in qc.auto and not ran.get(kind)]
                if fell:        # no lean step graph, or no shape the kernels take: MatMulNBits ran them
                    qc = replace(qc, **dict.fromkeys(fell, "nbits"), auto=tuple(f for f in qc.auto if f not in fell))
                if "fp32_matmul" in qc.auto and not backend_info.get("linear16"):      # no lean step graph
                    qc = replace(qc, fp32_matmul="onnxruntime", auto=tuple(f for f in qc.auto if f != "fp32_matmul"))
                if "lora" in backend_info:
                    backend_info["lora"]["stored"] = stored_rows(loaded, backend_info["lora"]["linears"])
            if loaded.text is not None:         # tokenizer file(s); the rest goes in the manifest
                for name, data in loaded.text.files.items():
                    (tmp / name).write_bytes(data)
            manifest = {
                "glmc_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": loaded.source,
                "model": {"model_type": loaded.model_type, "source_layout": loaded.source_layout, "config": cfg},
                "target": str(target), "dtype": dtype, "quant": quant,
                "group_size": group_size if quant == "int4" else None,
                "max_seq_len": seq,
                "text": loaded.text.meta() if loaded.text is not None else None,
                "passes": [r.as_dict() for r in records],
                "backend": backend_info,
                "versions": _versions(),
            }
            write_manifest(tmp, manifest)
            result = None
            with stages.stage("verify vs transformers"):
                no_device = backend.why_cannot_run_here() if verify else None
                if verify and not no_device:
                    result = _verify(tmp, backend, Reference.of(loaded), ctx, pipeline)
            tuning = None
            if tune:
                with stages.stage("tune"):
                    from glmc.autotune import tune_artifact

                    tuning = tune_artifact(tmp, budget_s=tune_budget)
            with stages.stage("write artifact"):
                n_params = loaded.parameter_count()
                report = {
                    "seconds": round(time.perf_counter() - t_start, 2),
                    "stage_seconds": stages.times,
                    "stage_peak_rss_mb": stages.peak_rss_mb,
                    "peak_rss_mb": round(peak_rss_mb(), 1),
                    "parameters": n_params,
                    "parameter_bytes_fp32": n_params * 4,
                    "artifact_bytes": sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()),
                    "verify": result.as_dict() if result else (
                        f"skipped: {no_device}" if no_device else "skipped (--no-verify)"),
                    "quantization": _quant_summary(quant_report, qc, calibrate),
                    "passes": [r.as_dict(with_histograms=True) for r in records],
                    "warnings": loaded.warnings,
                    "tuning": tuning,
                }
                report["peak_rss_over_fp32_weights"] = round(report["peak_rss_mb"] * 2**20 / max(1, n_params * 4), 2)
                (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
                write_manifest(tmp, manifest)
    return out


def trace_entries(model, ctx, pipeline, extend: bool) -> list:
    """The entry points a compile traces: cpu: extend; gpu: prefill, decode, [extend], and
    score (every position's logits) when last_token_logits leaves prefill with the last
    token's only. The cpu step graph gives every position's logits itself (it is told which
    rows to compute): cpu asks for score while lowering (`late_entries`) only when it
    cannot build that graph."""
    from glmc import trace

    cfg, seq = dict(ctx.model_config), ctx.max_seq_len
    if ctx.target.family == "cpu":
        # one entry for prompts, chunks and decode steps: one onnxruntime session, so one
        # pre-packed copy of the weights, and each call reads only the cache slots in use
        return [trace.trace_extend(model, cfg, seq)]
    graphs = [trace.trace_prefill(model, cfg, seq), trace.trace_decode(model, cfg, seq)]
    if extend:      # long prompts prefilled chunk by chunk over the cache
        graphs.append(trace.trace_extend(model, cfg, seq))
    if _last_token_only(pipeline):
        graphs.append(trace.trace_prefill(model, cfg, seq, name="score"))
    return graphs


def _last_token_only(pipeline) -> bool:
    return any(name == "last_token_logits" for name, _ in pipeline)


def late_entries(model, ctx, pipeline, records: list):
    """What a backend calls while lowering for an entry it needs after all: entry(name) ->
    that entry traced and rewritten (its pass records added to `records`); None when the
    pipeline leaves every entry with every position's logits (no score entry is needed)."""
    from glmc import trace

    if not _last_token_only(pipeline):
        return None

    def entry(name: str):
        if name != "score":
            raise ValueError(f"no late entry {name!r}")
        g = trace.trace_prefill(model, dict(ctx.model_config), ctx.max_seq_len, name=name)
        g.gm, recs = run_pipeline(g.gm, ctx.for_entry(name), name, pipeline)
        records.extend(recs)
        return g

    return entry


def run_passes(graphs: list, ctx, pipeline) -> list:
    """Run the pipeline on every entry point's graph in place; the pass records."""
    records = []
    for g in graphs:
        g.gm, recs = run_pipeline(g.gm, ctx.for_entry(g.name), g.name, pipeline)
        records += recs
    return records


def _quant_summary(report: dict, q: QuantConfig, calibrate: int) -> dict | None:
    if q.mode == "none":
        return None
    # the decoder blocks' linears (the lm_head is int8 whatever --quant says)
    blocks = {k: v for k, v in report.items() if v["bits"] != 8 or q.mode == "int8"}
    blocks_fp32 = sum(v["bytes_fp32"] for v in blocks.values())
    blocks_packed = sum(v["bytes_packed"] for v in blocks.values())
    fp32 = sum(v["bytes_fp32"] for v in report.values())
    packed = sum(v["bytes_packed"] for v in report.values())
    return {
        "quant": q.mode, "group_size": q.group_size if q.mode == "int4" else None,
        "symmetric": q.symmetric, "lm_head": q.lm_head, "embedding": q.embedding, "accuracy_level": q.accuracy_level,
        "kv_cache": q.kv_cache, "int8_matmul": q.int8_matmul, "int4_matmul": q.int4_matmul,
        "fp32_matmul": q.fp32_matmul,
        "calibration_sequences": calibrate,
        "linear_bytes_fp32": fp32, "linear_bytes_fp16": fp32 // 2, "linear_bytes_packed": packed,
        "packed_over_fp16": round(packed / max(1, fp32 // 2), 4),
        "block_linear_bytes_fp16": blocks_fp32 // 2, "block_linear_bytes_packed": blocks_packed,
        "block_packed_over_fp16": round(blocks_packed / max(1, blocks_fp32 // 2), 4),
        "per_layer": report,
        "max_relative_error": max((v["relative_error"] for v in blocks.values()), default=0.0),
    }


def _weight_book(loaded, eager: bool) -> WeightBook:
    """The compile's WeightBook: every parameter of the traced model is a recipe over its
    checkpoint tensor (lazy), or (eager, for calibration) its value in memory."""
    book = WeightBook(eager=eager)
    if not eager:
        for name, p in loaded.model.named_parameters():
            if name in loaded.tensors:
                book.register(p, loaded.tensors.lazy(name))
    return book


def read_adapters(lora: Sequence, allow_pickle: bool = False) -> list:
    """--lora PATH [--lora-scale S]: each item a path or (path, scale)."""
    from glmc.lora import read_adapter

    out = []
    for item in lora or ():
        path, scale = item if isinstance(item, tuple) else (item, 1.0)
        out.append(read_adapter(path, scale, allow_pickle))
    return out


def compile_memory_bytes(cfg: dict, qc: QuantConfig, verify: bool) -> float:
    """Peak memory of a compile, estimated from the config before any weight is read.

    Measured on this project's machine (report.json's stage_peak_rss_mb; README, "Model size"):
    the process with its libraries and traced graphs is ~0.6 GiB (the example KV cache the
    entries are traced with is never written, so never resident); lowering one row chunk of
    one weight at a time (a whole matrix for an unquantized transpose); verification one fp32
    decoder layer of the reference plus one depth of the artifact in onnxruntime
    (backends/cpu/layerwise.py: a decoder layer, or the embedding table, or the final norm
    and lm_head, whichever is largest). The verified 9B compiles measured 2.38 / 2.40 GiB
    (int4 / int8) against 2.74 GiB estimated."""
    from glmc.checkpoint import count_parameters

    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    tables = V * H * (1 if cfg.get("tie_word_embeddings") else 2)
    linears = count_parameters(cfg) - tables
    largest = max(V * H, 2 * cfg["intermediate_size"] * H)
    lower = 3 * 4 * (largest if qc.mode == "none" else min(largest, CHUNK_ELEMENTS))
    need = BASE_COMPILE_BYTES + lower
    if verify:
        blocks, embedding, head = artifact_parts(cfg, qc)
        need += 4 * linears / L + VERIFY_OVER_SEGMENT * max(blocks / L, embedding, head)
    return need


def artifact_parts(cfg: dict, qc: QuantConfig) -> tuple[float, float, float]:
    """The weight bytes a compile writes for (the decoder layers, the embedding table, the lm_head)."""
    from glmc.checkpoint import count_parameters

    H, V = cfg["hidden_size"], cfg["vocab_size"]
    tied = bool(cfg.get("tie_word_embeddings"))
    linears = count_parameters(cfg) - V * H * (1 if tied else 2)
    per_param = {"none": 4.0, "int8": 1.0 + 4 / 128, "int4": 0.5 + 4 / qc.group_size + (0 if qc.symmetric else 0.5 / qc.group_size)}[qc.mode]
    embedding = V * H * (1.0 if qc.embedding == "int8" else 4.0)
    head = V * H * (4.0 if qc.mode == "none" or qc.lm_head == "none" else 1.0 + 4 / 128)
    return linears * per_param, embedding, head


def _verify(tmp: Path, backend, reference, ctx, pipeline):
    from glmc.runtime import Runtime
    from glmc.verify import compare, summary

    runtime = Runtime(tmp, verify=False)
    result = compare(runtime, reference, ctx.dtype, ctx.quant.mode)
    del runtime
    if not result.ok:
        # a layer-by-layer run says where itself; otherwise lower a hidden-states graph to find it
        where = (f"first diverges at {result.where}" if result.where
                 else diagnose(backend, reference, ctx, pipeline, result.allowed))
        measured = summary(result.as_dict())
        if result.measure == "layer_relative_error":
            measured += f", top-1 agreement {result.top1_agreement:.0%}"
        raise VerificationError(
            f"compiled model disagrees with transformers: {measured} "
            f"({ctx.dtype}, quant {ctx.quant.mode}); {where}; artifact not written (--no-verify skips this check)"
        )
    return result


# what lowering/running the diagnosis graph may fail with: the diagnosis is best effort and the
# verification failure stands either way, so these become the reason in the message
_DIAGNOSIS_ERRORS = (GlmcError, RuntimeError, ValueError, TypeError, KeyError, IndexError, OSError)


def diagnose(backend, reference, ctx, pipeline, allowed) -> str:
    """Lower a prefill graph that also returns every hidden state through the artifact's own
    backend; compare each layer with transformers' and name where they first diverge."""
    from glmc.trace import trace_prefill
    from glmc.verify import first_divergent_layer, fixed_prompts

    cfg = ctx.model_config
    reference = Reference.of(reference)
    try:
        g = trace_prefill(reference.model, dict(cfg), ctx.max_seq_len, hidden_states=True)
        g.gm, _ = run_pipeline(g.gm, ctx.for_entry("score"), "prefill+hidden", pipeline)
        ids = fixed_prompts(cfg["vocab_size"], ctx.max_seq_len)[0]
        ours = backend.hidden_states(g, ctx, ids)
        _, ref = reference.run([ids])
        layer, diff = first_divergent_layer(ours, ref[0], allowed)
    except _DIAGNOSIS_ERRORS as e:
        return f"could not localise the divergence ({type(e).__name__}: {e})"
    if layer is None:
        return "all decoder layers agree; the divergence is in the final norm or lm_head"
    if layer == 0:
        return f"the embeddings already differ (max diff {diff:.3g})"
    return f"first diverges at decoder layer {layer - 1} (hidden-state max diff {diff:.3g})"
