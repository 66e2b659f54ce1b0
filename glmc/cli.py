"""The glmc command line (click). Every user mistake is one line on stderr and a
non-zero exit; a traceback means a glmc bug."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import click

from glmc.errors import GlmcError, GlmcWarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """glmc's own warnings as one line; others as Python prints them."""
    if issubclass(category, GlmcWarning):
        click.echo(f"glmc: warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


class _Group(click.Group):
    def invoke(self, ctx):
        warnings.showwarning = _show_warning
        try:
            return super().invoke(ctx)
        except GlmcError as e:
            click.echo(f"glmc: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("glmc: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="glmc")
def main():
    """glmc: compile GLM-family models for CPU (ONNX Runtime), run and verify them."""


@main.command()
def presets():
    """List the built-in presets (seeded random weights, no download)."""
    from glmc.presets import PRESETS

    for p in PRESETS.values():
        click.echo(f"{p.name:<10} {p.description}")


@main.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(), help="Artifact directory (default: NAME.glmc).")
@click.option("--target", default="cpu", show_default=True,
              help="cpu | cuda[:sm_80,sm_90] | rocm[:gfx906,gfx90a,gfx942]")
@click.option("--quant", default="none", show_default=True, help="none | int8 | int4")
@click.option("--group-size", default=128, show_default=True, type=int, help="int4 group size.")
@click.option("--dtype", default=None, help="fp32 | fp16 | bf16 (default: fp32 on cpu, fp16 on cuda/rocm; cpu 16-bit: "
              "unquantized linears in 16 bits on TVM kernels, glmc[cpu16])")
@click.option("--max-seq-len", type=int, default=None,
              help="KV-cache capacity (prompt + generated). Default: min(max_position_embeddings, 2048).")
@click.option("--tune/--no-tune", default=False, show_default=True,
              help="Measure on this machine (cpu: thread count and prefill chunk size) and store it in the artifact.")
@click.option("--tune-budget", default=120.0, show_default=True, type=float, help="Seconds tuning may take.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the artifact against transformers before writing it.")
@click.option("--fuse/--no-fuse", default=True, show_default=True, help="Run the fusion passes.")
@click.option("--calibrate", default=0, show_default=True, type=int,
              help="int4: search activation-aware scales on N calibration sequences (0 = round-to-nearest).")
@click.option("--asym", is_flag=True, help="int4 with zero points (asymmetric) instead of symmetric.")
@click.option("--lm-head", default="int8", show_default=True, type=click.Choice(["int8", "int4", "none"]),
              help="The lm_head's precision with --quant: int8 (per channel), int4 (group-wise, --group-size) "
                   "or fp32 (none).")
@click.option("--embedding", default=None, type=click.Choice(["fp32", "int8"]),
              help="Embedding table precision. Default: int8 (per-row scales) with --quant on cpu, else fp32; "
                   "a 151552 x 4096 table is 2.5 GB in fp32, 0.6 GB in int8.")
@click.option("--kv-cache", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="cpu KV-cache storage; fp16 halves the cache (long contexts), attention still computes in fp32.")
@click.option("--accuracy-level", default=4, show_default=True, type=click.IntRange(0, 4),
              help="cpu int4/int8 matmuls: 4 = int8 activations inside the kernel (fast), 0 = fp32 activations.")
@click.option("--int8-matmul", default="auto", show_default=True,
              type=click.Choice(["auto", "nbits", "dynamic", "glmc"]),
              help="cpu int8 linears: glmc (glmc's TVM kernels, every int8 linear, the lm_head too), nbits "
                   "(MatMulNBits, int8 activations per 128-block) or dynamic (DynamicQuantizeMatMul for the decoder "
                   "linears: one activation scale per call, shared by a batch's rows; integer GEMM; the lm_head "
                   "keeps nbits). auto: glmc where this build and CPU can run it (AVX2, apache-tvm), else nbits.")
@click.option("--int4-matmul", default="auto", show_default=True, type=click.Choice(["auto", "nbits", "glmc"]),
              help="cpu int4 linears: glmc (glmc's TVM kernels, the same int8-activation arithmetic; symmetric "
                   "int4, group a multiple of 32) or nbits (onnxruntime's MatMulNBits). auto: glmc where this "
                   "build and CPU can run it, else nbits.")
@click.option("--fp32-matmul", default="auto", show_default=True, type=click.Choice(["auto", "onnxruntime", "glmc"]),
              help="cpu linears of an unquantized fp32 build: glmc (glmc's TVM kernels over the weights in "
                   "their block layout, read in place) or onnxruntime (its MatMul, over a pre-packed copy). "
                   "auto: glmc where this build can run it (apache-tvm) and the model has 128 MiB of fp32 "
                   "linear weights or more.")
@click.option("--chunked-prefill/--no-chunked-prefill", default=None,
              help="GPU targets: build the extend entry point so long prompts are prefilled in (tuned) "
                   "chunks (default: on). cpu artifacts always run every step through it.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept .bin/.pt weights, loaded only through torch.load(weights_only=True).")
@click.option("--rope-ratio-as", type=click.Choice(["base", "positions"]), default=None,
              help="chatglm config rope_ratio: multiply the rotary base (ChatGLM3-6B-32k, GLM-4) or divide "
                   "positions (chatglm2-6b-32k). Default: as the modeling_chatglm.py beside the checkpoint does.")
@click.option("--lora", "lora", multiple=True, type=click.Path(),
              help="A PEFT LoRA adapter directory to merge into the weights (repeatable).")
@click.option("--lora-scale", "lora_scale", multiple=True, type=float,
              help="Scale of each --lora, in order (one value applies to all; default 1).")
@click.option("--lora-slots", type=int, default=0, show_default=True,
              help="cpu: run-time adapter slots. The decoder linears take per-request LoRA adapters loaded "
                   "with Runtime.add_adapter / glmc serve --adapter, kept unmerged beside the base weights.")
@click.option("--lora-rank", type=int, default=16, show_default=True,
              help="The largest adapter rank the --lora-slots take.")
def compile(model, output, target, quant, group_size, dtype, max_seq_len, tune, tune_budget, verify, fuse, calibrate,
            asym, lm_head, embedding, kv_cache, accuracy_level, int8_matmul, int4_matmul, fp32_matmul, chunked_prefill,
            allow_pickle, rope_ratio_as, lora, lora_scale, lora_slots, lora_rank):
    """Compile MODEL (a checkpoint directory or a preset name) into an artifact."""
    import json

    from glmc.compiler import compile as do_compile
    from glmc.verify import summary

    if lora_scale and len(lora_scale) not in (1, len(lora)):
        raise GlmcError(f"--lora-scale given {len(lora_scale)} times for {len(lora)} --lora adapters "
                        "(give one for all, or one per adapter)")
    scales = list(lora_scale) * len(lora) if len(lora_scale) == 1 else list(lora_scale) or [1.0] * len(lora)
    t0 = time.perf_counter()
    out = do_compile(model, output, target=target, dtype=dtype, quant=quant, group_size=group_size,
                     max_seq_len=max_seq_len, verify=verify, fuse=fuse, progress=sys.stderr.isatty(),
                     calibrate=calibrate, symmetric=not asym, lm_head=lm_head, accuracy_level=accuracy_level,
                     embedding=embedding, kv_cache=kv_cache, allow_pickle=allow_pickle, tune=tune, tune_budget=tune_budget,
                     chunked_prefill=chunked_prefill, rope_ratio_as=rope_ratio_as, lora=list(zip(lora, scales)),
                     lora_slots=lora_slots, lora_rank=lora_rank, int8_matmul=int8_matmul, int4_matmul=int4_matmul,
                     fp32_matmul=fp32_matmul)
    report = json.loads((out / "report.json").read_text())
    v = report["verify"]
    if not isinstance(v, dict):
        verdict = f"not verified ({v})" if v.startswith("skipped: no") else "not verified (--no-verify)"
    else:
        verdict = f"verified: {summary(v)}"
    click.echo(f"wrote {out} ({report['artifact_bytes'] / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s; "
               f"{verdict}; peak RSS {report['peak_rss_mb']:.0f} MiB")
    q = report.get("quantization")
    if q:
        agree = f"; top-1 agreement with fp32 {v['top1_agreement']:.0%}" if isinstance(v, dict) else ""
        click.echo(f"{q['quant']}: linear weights {q['linear_bytes_fp32'] / 2**20:.1f} MiB fp32 -> "
                   f"{q['linear_bytes_packed'] / 2**20:.1f} MiB packed ({q['packed_over_fp16']:.0%} of fp16; "
                   f"decoder blocks {q['block_packed_over_fp16']:.0%}); "
                   f"max per-layer relative error {q['max_relative_error']:.3f}{agree}")


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise GlmcError(f"--ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise GlmcError("--ids is empty")
    return ids


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", help="Text prompt (needs a tokenizer in the artifact).")
@click.option("--ids", help="Prompt as token ids, e.g. 5,6,7.")
@click.option("--max-new-tokens", default=None, type=int,
              help="Default: the checkpoint's generation_config.json max_new_tokens, else 32.")
@click.option("--temperature", default=None, type=float,
              help="0 = greedy. Default: the checkpoint's generation_config.json when it samples, else 0.")
@click.option("--top-k", default=None, type=int, help="0 = off. Default: as --temperature.")
@click.option("--top-p", default=None, type=float, help="Default: as --temperature, else 1.")
@click.option("--seed", default=None, type=int, help="Sampling seed (reproducible).")
@click.option("--threads", default=None, type=int, help="CPU threads (default: all available).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check file hashes on load.")
@click.option("--adapter", type=click.Path(), default=None,
              help="A PEFT LoRA adapter directory, applied at run time (artifacts compiled with --lora-slots).")
def run(artifact, prompt, ids, max_new_tokens, temperature, top_k, top_p, seed, threads, verify, adapter):
    """Generate from ARTIFACT and print tokens and timings."""
    from glmc.runtime import load

    if (prompt is None) == (ids is None):
        raise GlmcError("give exactly one of --prompt TEXT or --ids 1,2,3")
    model = load(artifact, verify=verify, threads=threads)
    if adapter:
        model.add_adapter("adapter", adapter)
    prompt_ids = model.encode(prompt) if prompt is not None else _parse_ids(ids)
    made, text = [], []
    t0 = time.perf_counter()
    t_first = None
    for tok in model.stream(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, adapter="adapter" if adapter else None):
        if t_first is None:
            t_first = time.perf_counter()
        made.append(tok.id)
        if prompt is not None and tok.text:
            text.append(tok.text)
    t_end = time.perf_counter()
    click.echo("ids: " + " ".join(map(str, made)))
    if prompt is not None:
        click.echo("text: " + repr(prompt + "".join(text)))
    if made:
        n_dec = len(made) - 1
        dec = f"; decode {n_dec} tokens in {(t_end - t_first) * 1e3:.1f} ms"
        if n_dec:
            dec += f" ({n_dec / (t_end - t_first):.1f} tok/s)"
        click.echo(f"prefill {len(prompt_ids)} tokens + first token: {(t_first - t0) * 1e3:.1f} ms{dec}")


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--system", default=None, help="A system message to open the conversation with.")
@click.option("--max-new-tokens", default=None, type=int,
              help="Per reply. Default: the checkpoint's generation_config.json, else until the artifact is full.")
@click.option("--temperature", default=None, type=float,
              help="0 = greedy. Default: the checkpoint's generation_config.json when it samples, else 0.")
@click.option("--top-k", default=None, type=int, help="0 = off.")
@click.option("--top-p", default=None, type=float)
@click.option("--seed", default=None, type=int, help="Sampling seed (reproducible).")
@click.option("--threads", default=None, type=int, help="CPU threads (default: all available).")
@click.option("--adapter", type=click.Path(), default=None,
              help="A PEFT LoRA adapter directory, applied at run time (artifacts compiled with --lora-slots).")
def chat(artifact, system, max_new_tokens, temperature, top_k, top_p, seed, threads, adapter):
    """An interactive chat with ARTIFACT in its chat format, streaming each reply.
    Commands: /reset starts over, /quit (or end of input) leaves."""
    from glmc.runtime import load

    model = load(artifact, threads=threads)
    if model.codec is None:
        raise GlmcError(f"{artifact}: the artifact has no tokenizer, so it cannot chat")
    if adapter:
        model.add_adapter("adapter", adapter)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    click.echo(f"glmc chat: {artifact} ({model.codec.chat_format} format); /reset, /quit", err=True)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        click.echo("glm> ", nl=False)
        reply, opening = [], model.codec.opening_filter()
        for tok in model.stream_chat(messages, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed, adapter="adapter" if adapter else None):
            reply.append(tok.text or "")
            text = opening(tok.text or "")
            if text:
                click.echo(text, nl=False)
        click.echo()
        messages.append({"role": "assistant", "content": model.codec.reply("".join(reply))})


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-batch", default=8, show_default=True, type=int,
              help="KV-cache rows: requests decoded together (continuous batching).")
@click.option("--max-queue", default=64, show_default=True, type=int,
              help="Requests that may wait for a row; beyond it the server answers 429.")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1/ requests.")
@click.option("--threads", default=None, type=int, help="CPU threads (default: all available).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="A PEFT LoRA adapter loaded into a run-time slot (artifacts compiled with --lora-slots); "
                   "requests choose it as their \"model\". Repeatable.")
def serve(artifact, host, port, max_batch, max_queue, api_key, threads, adapters):
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health), with continuous batching."""
    from glmc.serve import serve as run_server

    pairs = []
    for item in adapters:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise GlmcError(f"--adapter takes NAME=DIR, got {item!r}")
        pairs.append((name, path))
    run_server(artifact, host=host, port=port, max_batch=max_batch, max_queue=max_queue, api_key=api_key,
               threads=threads, announce=click.echo, adapters=pairs)


@main.command()
@click.argument("model_or_artifact")
@click.option("--full", is_flag=True, help="Print the whole op histogram after every pass.")
@click.option("--target", default="cpu", show_default=True, help="The target whose compile to describe (a model).")
@click.option("--rope-ratio-as", type=click.Choice(["base", "positions"]), default=None,
              help="As for compile: how a chatglm config's rope_ratio applies.")
def inspect(model_or_artifact, full, target, rope_ratio_as):
    """Print the traced graphs' op histograms and each pass with its match count."""
    from pathlib import Path

    from glmc.inspect import describe_artifact, describe_model

    if (Path(model_or_artifact) / "manifest.json").is_file():
        click.echo(describe_artifact(Path(model_or_artifact)))
    else:
        click.echo(describe_model(model_or_artifact, full=full, target=target, rope_ratio_as=rope_ratio_as))


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--model", "source", default=None,
              help="Reference checkpoint or preset (default: the one the artifact was compiled from).")
def verify(artifact, source):
    """Re-check ARTIFACT against transformers' own modules (one decoder layer in memory at a
    time); print the max logits difference."""
    from glmc.checkpoint import open_model
    from glmc.runtime import load
    from glmc.verify import Reference, compare, summary

    rt = load(artifact)
    src = rt.manifest["source"]
    name = source or src["name"]
    from glmc.compiler import read_adapters

    adapters = read_adapters([(a["path"], a["scale"]) for a in src.get("adapters", [])], allow_pickle=True)
    for a, rec in zip(adapters, src.get("adapters", [])):
        if a.sha256 != rec["sha256"]:
            raise GlmcError(f"{a.path}: is not the adapter {artifact} was compiled with (sha256 differs)")
    ref = open_model(name, purpose="verifying", rope_ratio_as=src.get("rope_ratio_as"), adapters=adapters)
    if ref.source["sha256"] != src["sha256"]:
        raise GlmcError(f"{name}: is not the checkpoint {artifact} was compiled from (sha256 differs)")
    r = compare(rt, Reference.of(ref), rt.manifest["dtype"], rt.manifest["quant"])
    click.echo(f"max |logits diff| {r.max_abs_diff:.3e} over {r.positions} positions; checked {summary(r.as_dict())}; "
               f"top-1 agreement {r.top1_agreement:.0%}: " + ("OK" if r.ok else f"FAILED{f' at {r.where}' if r.where else ''}"))
    if not r.ok:
        sys.exit(3)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--report", "report_dir", type=click.Path(), default=None,
              help="Also write a report (JSON + matmul throughput heat-map PNG) into this directory.")
@click.option("--tune-budget", default=120.0, show_default=True, type=float, help="Seconds tuning may take.")
def tune(artifact, report_dir, tune_budget):
    """Re-tune ARTIFACT on this machine (cpu: thread count, prefill chunk size)."""
    from glmc.autotune import tune_artifact

    r = tune_artifact(Path(artifact), budget_s=tune_budget, report_dir=Path(report_dir) if report_dir else None)
    if "configs" in r:
        vendor = sum(1 for v in r["configs"].values() if v == "torch")
        click.echo(f"{artifact}: tuned {r['tuned']} of {r['shapes']} kernel shapes on {r['device']} "
                   f"({vendor} use the vendor library); {r['measured']} measured, {r['reused']} reused from the "
                   f"tuning database" + (f"; report in {r['report']}" if "report" in r else ""))
        return
    best = max(r["prefill_tokens_per_s"].values()) if r["prefill_tokens_per_s"] else 0
    click.echo(f"{artifact}: threads {r['threads']}, prefill chunk {r['prefill_chunk']} tokens "
               f"(best prefill {best:.0f} tok/s); {r['measured']} measured, {r['reused']} reused from the "
               f"tuning database" + (f"; report in {r['report']}" if "report" in r else ""))


@main.command()
@click.argument("artifact_or_model")
@click.option("--quick", is_flag=True, help="Short run (CI smoke): fewer lengths and repeats, no torch.compile.")
@click.option("-o", "--output", "out_dir", default="glmc-bench", show_default=True, type=click.Path(),
              help="Report directory (report.json, report.md, report.html + PNGs).")
@click.option("--no-eager", is_flag=True, help="Skip the transformers eager baseline.")
@click.option("--no-compile", is_flag=True, help="Skip the torch.compile baseline.")
@click.option("--no-ort", is_flag=True, help="Skip the plain onnxruntime export baseline.")
@click.option("--peers", is_flag=True,
              help="Also time other engines on the same weights at the same precision (ONNX Runtime GenAI; "
                   "pip install glmc[peers]).")
def bench(artifact_or_model, quick, out_dir, no_eager, no_compile, no_ort, peers):
    """Benchmark an artifact (or a model, compiled on the fly) against the baselines."""
    from pathlib import Path

    import logging

    from glmc.benchmark import run as run_bench

    progress = logging.getLogger("glmc.bench")          # only bench's own progress lines, not other loggers'
    if not progress.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[glmc bench] %(message)s"))
        progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False

    skip = tuple(n for n, off in (("eager", no_eager), ("compile", no_compile), ("ort-plain", no_ort)) if off)
    report = run_bench(artifact_or_model, Path(out_dir), quick=quick, skip=skip, peers=peers)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"glmc bench {artifact_or_model}")
    for col in ("provider", "prefill ms (longest)", "decode tok/s (shortest ctx)", "roofline (decode)"):
        table.add_column(col)
    L = str(report["settings"]["prompt_lengths"][-1])
    C = str(report["settings"]["contexts"][0])
    for name, r in report["results"].items():
        if "error" in r:
            table.add_row(name, "failed", r["error"][:60], "")
        else:
            table.add_row(name, f"{r['prefill'][L]['seconds']['median'] * 1e3:.1f}",
                          f"{r['decode'][C]['tokens_per_s']:.1f}", f"{r['decode'][C]['roofline_fraction']:.0%}")
    Console(stderr=False).print(table)
    click.echo(f"report: {Path(out_dir) / 'report.html'}")


if __name__ == "__main__":
    main()
