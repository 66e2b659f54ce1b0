"""`glmc bench`: how fast is glmc on this machine, against what users would otherwise run.

Providers (same checkpoint, same threads, one run):
  glmc         the artifact (or the model compiled on the fly)
  eager        transformers' eager model, KV cache, greedy loop
  compile      torch.compile of that model (skipped by --quick: its warm-up alone is minutes)
  ort-plain    onnxruntime on a plain torch.onnx.export of transformers' forward (no KV
               cache in a plain export, so decode re-runs the sequence)
  ort-genai    with --peers: ONNX Runtime GenAI on the same weights at the artifact's
               precision, through its own generation API (glmc/peers.py)
  llama.cpp    with --peers: llama.cpp (llama-cpp-python) on the same weights written as
               GGUF by glmc, F32 / Q8_0 / Q4_0 for fp32 / int8 / int4 artifacts
Correctness before timing: every provider's greedy tokens are checked against eager
(a quantized glmc artifact is checked like `glmc verify`: its logits against its
source's fp32 model within the artifact's relative-RMS bound). A baseline that fails is
reported with its error and the run goes on; glmc failing (to load, to agree, to run)
ends the run with an error: a report without glmc's numbers would be a wrong answer.
Timing: glmc and the peers in turn within every repeat (measure_providers), the baselines
one after another. Beside each peer's ratio of medians, the ratios of its repeats paired
with glmc's (`paired_ratios`: min / median / max).
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from glmc.errors import GlmcError
from glmc.modelcfg import head_dim
from glmc.measure import cpu_name, matmul_tflops, measure, peak_rss_mb, read_bandwidth_gbs, summarize

log = logging.getLogger("glmc.bench")

SCHEMA_VERSION = 1


# ---- machine ceilings ----------------------------------------------------------------------

def machine_info(quick: bool) -> dict:
    import onnxruntime

    import glmc

    info = {
        "cpu": cpu_name(), "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "read_bandwidth_gbs": round(read_bandwidth_gbs(256 if quick else 1024), 2),
        "fp32_matmul_tflops": round(matmul_tflops(1024 if quick else 2048), 4),
        "versions": {"glmc": glmc.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }
    try:
        import triton

        info["versions"]["triton"] = triton.__version__
    except ImportError:
        info["versions"]["triton"] = None
    return info


# ---- providers -----------------------------------------------------------------------------

class Provider:
    """What a benchmarked engine offers. Decode is split so that only the steps are timed:
    start(ids) prefills and picks the first greedy token (untimed, glmc.measure's setup),
    steps(state, n) makes n more greedy tokens (timed)."""

    name = "?"

    def prefill(self, ids) -> None: ...

    def start(self, ids) -> dict: ...

    def steps(self, state: dict, n: int) -> list[int]: ...

    def greedy(self, ids, n: int) -> list[int]:
        """The first token after `ids` and n more (what correctness checks compare)."""
        state = self.start(ids)
        return [state["tok"]] + self.steps(state, n)


def time_decode(provider: Provider, ids, n: int, repeats: int) -> dict:
    """Seconds per decode step after a prefill of `ids` (min/median/max over `repeats`)."""
    t = measure(lambda state: provider.steps(state, n), repeats=repeats, warmup=1, setup=lambda: provider.start(ids))
    return summarize([x / max(1, n) for x in t["samples"]])


class GlmcProvider(Provider):
    name = "glmc"

    def __init__(self, path):
        import glmc

        self.rt = glmc.load(path)

    def prefill(self, ids):
        self.rt.prefill([ids])

    def start(self, ids):
        cache, last = self.rt.prefill([ids])
        return {"cache": cache, "tok": int(last[0].argmax()), "pos": np.array([len(ids)])}

    def steps(self, state, n):
        ex, toks = self.rt.executor, []
        for _ in range(n):
            state["tok"] = int(ex.decode(state["cache"], np.array([[state["tok"]]]), state["pos"])[0, 0].argmax())
            state["pos"] += 1
            toks.append(state["tok"])
        return toks


class EagerProvider(Provider):
    name = "eager"

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def prefill(self, ids):
        self.model(input_ids=torch.tensor([ids]), use_cache=True)

    @torch.no_grad()
    def start(self, ids):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        return {"cache": cache, "tok": int(out.logits[0, -1].argmax())}

    @torch.no_grad()
    def steps(self, state, n):
        toks = []
        for _ in range(n):
            out = self.model(input_ids=torch.tensor([[state["tok"]]]), past_key_values=state["cache"], use_cache=True)
            state["tok"] = int(out.logits[0, -1].argmax())
            toks.append(state["tok"])
        return toks


class CompileProvider(EagerProvider):
    name = "compile"

    def __init__(self, model):
        super().__init__(torch.compile(model, dynamic=True))


class OrtPlainProvider(Provider):
    name = "ort-plain"

    def __init__(self, model, workdir):
        import contextlib
        import io
        import warnings

        import onnxruntime as ort

        class Plain(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids):
                return self.m(input_ids=input_ids, use_cache=False).logits

        path = Path(workdir) / "plain.onnx"
        T = torch.export.Dim("T", min=1, max=4096)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(Plain(model), (torch.tensor([[5, 6, 7, 8]]),), str(path), dynamo=True,
                              dynamic_shapes=({1: T},), input_names=["input_ids"], output_names=["logits"],
                              external_data=True, verbose=False)
        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def _next(self, seq):
        return int(self.sess.run(None, {"input_ids": np.array([seq])})[0][0, -1].argmax())

    def prefill(self, ids):
        self.sess.run(None, {"input_ids": np.array([ids])})

    def start(self, ids):
        seq = list(ids) + [self._next(list(ids))]
        return {"seq": seq, "tok": seq[-1]}

    def steps(self, state, n):
        seq = state["seq"]
        for _ in range(n):
            seq.append(self._next(seq))
        state["tok"] = seq[-1]
        return seq[len(seq) - n:]


# ---- measurement ---------------------------------------------------------------------------

@dataclass
class Settings:
    prompt_lengths: list[int]
    contexts: list[int]
    decode_tokens: int
    repeats: int
    baselines: list[str]
    quick: bool = False
    extra: dict = field(default_factory=dict)


SWITCH_PAUSE_S = 0.25


def measure_provider(provider, prompt_pool: list[int], s: Settings) -> dict:
    return measure_providers({provider.name: provider}, prompt_pool, s)[provider.name]


def measure_providers(providers: dict, prompt_pool: list[int], s: Settings) -> dict[str, dict]:
    """Prefill and decode times of each provider, interleaved: every repeat of every prompt
    length and context runs each provider in turn, the order rotating by repeat. This host's
    read bandwidth moves between ~33 and ~55 GB/s within minutes; timed one engine after the
    other, a move fell on one of them and decided a ratio of two engines at the same bound.
    Before an engine's call, a pause of `SWITCH_PAUSE_S` lets the previous engine's threads
    stop spinning (TVM's, onnxruntime's and llama.cpp's pools poll for work after a call)."""
    from glmc import hugepages

    hugepages.settle()          # glmc's sessions' pages are moved before anything is timed
    names = list(providers)
    out = {n: {"prefill": {}, "decode": {}} for n in names}

    def rounds(run) -> dict[str, list[float]]:
        samples = {n: [] for n in names}
        for n in names:                                     # warm-up
            run(providers[n])
        for r in range(s.repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                if len(names) > 1:
                    time.sleep(SWITCH_PAUSE_S)
                samples[n].append(run(providers[n]))
        return samples

    for L in s.prompt_lengths:
        ids = prompt_pool[:L]
        for n, xs in rounds(lambda p: _seconds(lambda: p.prefill(ids))).items():
            t = dict(summarize(xs), samples=xs)         # samples: by repeat, as `paired_ratios` reads them
            out[n]["prefill"][str(L)] = {"seconds": t, "tokens_per_s": L / t["median"]}
    for C in s.contexts:
        ids = prompt_pool[:C]

        def decode(p):
            state = p.start(ids)
            return _seconds(lambda: p.steps(state, s.decode_tokens)) / max(1, s.decode_tokens)

        for n, xs in rounds(decode).items():
            per = dict(summarize(xs), samples=xs)
            out[n]["decode"][str(C)] = {"seconds_per_token": per, "tokens_per_s": 1 / per["median"]}
    return out


def paired_ratios(baseline: dict, ours: dict) -> dict | None:
    """min / median / max over repeats of baseline's time over ours in the same repeat (two
    `measure_providers` timings with samples): the engines ran one right after the other
    within a repeat, so a move of this host's bandwidth between repeats falls on both sides
    of each ratio, where the ratio of the two medians can set one engine's fast repeats
    against the other's slow ones. None where the samples are missing or do not pair up."""
    b, o = baseline.get("samples"), ours.get("samples")
    if not b or not o or len(b) != len(o):
        return None
    return summarize([x / y for x, y in zip(b, o)])


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# what a baseline may fail with (an export it cannot do, a compile that breaks, a wrong
# answer): reported in its row, never fatal
_BASELINE_ERRORS = (RuntimeError, ValueError, TypeError, AttributeError, KeyError, IndexError, OSError,
                    NotImplementedError, AssertionError, GlmcError)


def _check_glmc(artifact: Path, manifest: dict, model, provider, pool: list[int], want: list[int]) -> None:
    """glmc's correctness gate before timing: greedy tokens equal eager's (unquantized), or the
    logits within the artifact's relative-RMS bound of the fp32 source (quantized)."""
    from glmc.verify import compare, summary

    if manifest["quant"] == "none" and manifest["dtype"] == "fp32":
        got = provider.greedy(pool[:8], 6)
        if got != want:
            raise GlmcError(f"{artifact}: greedy tokens differ from transformers eager ({got} vs {want}); "
                            "not timing a wrong answer")
        return
    r = compare(provider.rt, model, manifest["dtype"], manifest["quant"])
    if not r.ok:
        raise GlmcError(f"{artifact}: disagrees with its fp32 source ({summary(r.as_dict())}); not timing a wrong answer")


def _peer_providers(loaded, manifest: dict, glmc_provider, pool, work: Path, say,
                    embedding_bytes: int) -> tuple[dict, dict]:
    """Other engines (glmc/peers.py) on the artifact's source weights at its precision, built
    and checked against transformers: (providers ready to time, {name: row}). A peer's row
    holds its check, version, precision and weight bytes, or why it cannot run."""
    from glmc.peers import LlamaCppProvider, OrtGenaiProvider, available, check_logits, write_hf_checkpoint

    threads = glmc_provider.rt.executor.threads
    ready, rows = {}, {}
    for name, why in available().items():
        if why:
            rows[name] = {"error": why}
            continue
        say(f"{name}: build, check")
        try:
            dtype = manifest.get("dtype", "fp32") if manifest["quant"] == "none" else "fp32"
            if name == "llama.cpp":
                p = LlamaCppProvider(loaded.model, loaded.config | {"model_type": loaded.model_type}, work / name,
                                     manifest["quant"], threads, manifest["max_seq_len"], dtype=dtype)
            else:
                hf = write_hf_checkpoint(loaded.model, loaded.tokenizer_json, work / "hf")
                p = OrtGenaiProvider(hf, work / name, manifest["quant"], manifest.get("group_size"), threads, dtype)
            rows[name] = dict(check=check_logits(p, loaded.model, pool[:8], manifest["quant"], dtype),
                              version=p.version, precision=p.precision, weight_bytes=p.weight_bytes(embedding_bytes))
            ready[name] = p
        except _BASELINE_ERRORS as e:
            rows[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
    return ready, rows


def run(target: str, out_dir: Path, quick: bool = False, skip: tuple = (), progress: bool = True,
        compile_options: dict | None = None, peers: bool = False, repeats: int | None = None) -> dict:
    """repeats: timed repeats per prompt length and context (default 3, quick 2)."""
    import glmc
    from glmc.artifact import read_manifest
    from glmc.backends import get_backend
    from glmc.checkpoint import load as load_model

    settings = Settings(
        prompt_lengths=[8, 32] if quick else [32, 128, 512],
        contexts=[16] if quick else [32, 256, 1024],
        decode_tokens=8 if quick else 16,
        repeats=repeats or (2 if quick else 3),
        baselines=[b for b in (["eager", "ort-plain"] if quick else ["eager", "compile", "ort-plain"]) if b not in skip],
        quick=quick,
    )
    say = log.info if progress else (lambda msg: None)
    say("measuring the machine (bandwidth, matmul peak)")
    machine = machine_info(quick)
    work = tempfile.TemporaryDirectory()
    try:
        path = Path(target)
        if (path / "manifest.json").is_file():
            artifact = path
        else:
            say(f"compiling {target}")
            artifact = glmc.compile(target, Path(work.name) / "bench.glmc",
                                    max_seq_len=64 if quick else 2048, **(compile_options or {}))
        manifest = read_manifest(artifact)
        cap = manifest["max_seq_len"]
        settings.prompt_lengths = [L for L in settings.prompt_lengths if L < cap] or [cap // 2]
        settings.contexts = [C for C in settings.contexts if C + settings.decode_tokens + 4 < cap] or [cap // 4]
        say(f"loading the reference model ({manifest['source']['name']})")
        try:
            loaded = load_model(manifest["source"]["name"])
        except GlmcError as e:
            raise GlmcError(f"baselines need the artifact's source model: {e}") from None
        model = loaded.model
        cfg = manifest["model"]["config"]
        n_params = sum(p.numel() for p in model.parameters())
        emb = model.get_input_embeddings().weight.numel()
        lm = model.get_output_embeddings().weight.numel()
        weights_file = artifact / manifest["backend"]["weights"]
        # bytes a decode step must read: the artifact's weights less the embedding table
        # (one row per token), plus the KV cache at the measured context
        summary = json.loads((artifact / "report.json").read_text()).get("quantization") \
            if (artifact / "report.json").is_file() else None
        emb_bytes = emb + 4 * cfg["vocab_size"] if (summary or {}).get("embedding") == "int8" else emb * 4
        decode_weight_bytes = max(1, weights_file.stat().st_size - emb_bytes)
        kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim(cfg) * 4
        rng = np.random.default_rng(0)
        pool = rng.integers(3, cfg["vocab_size"], max(settings.prompt_lengths + settings.contexts)).tolist()

        want = EagerProvider(model).greedy(pool[:8], 6)
        say("glmc: load, check, measure")
        glmc_provider = GlmcProvider(artifact)
        _check_glmc(artifact, manifest, model, glmc_provider, pool, want)
        timed, peer_rows = {"glmc": glmc_provider}, {}
        if peers:       # built first, then timed with glmc, interleaved (measure_providers)
            ready, peer_rows = _peer_providers(loaded, manifest, glmc_provider, pool, Path(work.name), say, emb * 4)
            timed.update(ready)
        say(f"measuring {', '.join(timed)}")
        measured = measure_providers(timed, pool, settings)
        results: dict[str, dict] = {"glmc": measured.pop("glmc")}
        makers = {"eager": lambda: EagerProvider(model), "compile": lambda: CompileProvider(model),
                  "ort-plain": lambda: OrtPlainProvider(model, work.name)}
        for name in settings.baselines:
            say(f"{name}: build, check, measure")
            try:
                p = makers[name]()
                got = p.greedy(pool[:8], 6)
                if got != want:
                    raise RuntimeError(f"greedy tokens differ from eager: {got} vs {want}")
                results[name] = measure_provider(p, pool, settings)
            except _BASELINE_ERRORS as e:   # a failing baseline is reported in its row
                results[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
        for name, row in peer_rows.items():
            results[name] = dict(measured[name], **row) if name in measured else row
        for name, r in results.items():
            if "error" in r:
                continue
            for L, pr in r["prefill"].items():
                flops = 2 * (n_params - emb - lm) * int(L) + 2 * lm
                pr["tflops"] = flops / pr["seconds"]["median"] / 1e12
                pr["peak_fraction"] = pr["tflops"] / machine["fp32_matmul_tflops"]
                pr["ttft_ms"] = pr["seconds"]["median"] * 1e3
            for C, dr in r["decode"].items():
                weights = decode_weight_bytes if name == "glmc" else r.get("weight_bytes", 4 * (n_params - emb))
                read = weights + kv_per_token * int(C)
                dr["gbs"] = read / dr["seconds_per_token"]["median"] / 1e9
                dr["roofline_fraction"] = dr["gbs"] / machine["read_bandwidth_gbs"]
        ratios = {}
        for name, r in results.items():
            if name == "glmc" or "error" in r:
                continue
            ratios[name] = {
                "prefill": {L: r["prefill"][L]["seconds"]["median"] / results["glmc"]["prefill"][L]["seconds"]["median"]
                            for L in results["glmc"]["prefill"]},
                "decode": {C: results["glmc"]["decode"][C]["tokens_per_s"] / r["decode"][C]["tokens_per_s"]
                           for C in results["glmc"]["decode"]},
            }
            if name in timed:       # timed in turn with glmc: its repeats pair up with glmc's
                ratios[name]["prefill_paired"] = {
                    L: paired_ratios(r["prefill"][L]["seconds"], results["glmc"]["prefill"][L]["seconds"])
                    for L in results["glmc"]["prefill"]}
                ratios[name]["decode_paired"] = {
                    C: paired_ratios(r["decode"][C]["seconds_per_token"],
                                     results["glmc"]["decode"][C]["seconds_per_token"])
                    for C in results["glmc"]["decode"]}
        say("profiling one decode step")
        backend = get_backend(manifest["target"])
        why = backend.why_cannot_run_here()
        breakdown = ({"skipped": why} if why else
                     backend.profile_decode(artifact, manifest, settings.contexts[-1], steps=8))
        report = {
            "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": target,
            "artifact": {"path": str(artifact), "target": manifest["target"], "dtype": manifest["dtype"],
                         "quant": manifest["quant"], "max_seq_len": cap,
                         "artifact_bytes": sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file()),
                         "weights_bytes": weights_file.stat().st_size},
            "model": {"parameters": n_params, "config": {k: cfg[k] for k in (
                "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")}},
            "machine": machine,
            "settings": {"prompt_lengths": settings.prompt_lengths, "contexts": settings.contexts,
                         "decode_tokens": settings.decode_tokens, "repeats": settings.repeats,
                         "baselines": settings.baselines, "quick": quick},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "results": results,
            "speedup_glmc_over": ratios,
            "decode_op_breakdown_ms": breakdown,
        }
    finally:
        work.cleanup()
    from glmc.bench_report import write_report

    write_report(report, out_dir)
    return report
