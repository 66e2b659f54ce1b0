"""Text for `glmc inspect`: op histograms and what each pass did."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def _hist_line(h: dict, top: int = 12) -> str:
    items = sorted(h.items(), key=lambda kv: (-kv[1], kv[0]))
    more = f", ... ({len(items) - top} more kinds)" if len(items) > top else ""
    return ", ".join(f"{k} x{v}" for k, v in items[:top]) + more


def _delta(before: dict, after: dict) -> str:
    d = Counter(after)
    d.subtract(Counter(before))
    parts = [f"{'+' if v > 0 else ''}{v} {k}" for k, v in sorted(d.items(), key=lambda kv: kv[1]) if v]
    return ", ".join(parts) if parts else "no change"


def describe_records(records, full: bool = False) -> list[str]:
    lines = []
    by_graph: dict[str, list] = {}
    for r in records:
        by_graph.setdefault(r.graph, []).append(r)
    for graph, recs in by_graph.items():
        lines.append(f"== {graph} graph: {recs[0].nodes_before} ATen nodes traced")
        lines.append(f"   before: {_hist_line(recs[0].hist_before)}")
        for r in recs:
            lines.append(f"   {r.name:<22} matches={r.matches:<4} nodes {r.nodes_before} -> {r.nodes_after}"
                         f"  ({r.ms:.1f} ms)  [{_delta(r.hist_before, r.hist_after)}]")
            if full:
                lines.append(f"      after: {_hist_line(r.hist_after, top=1000)}")
        lines.append(f"   after:  {_hist_line(recs[-1].hist_after)}")
    return lines


def describe_model(spec: str, full: bool = False, target: str = "cpu", rope_ratio_as: str | None = None) -> str:
    """What compile would do to SPEC's graphs: the same context, entry points and pipeline
    as `glmc compile SPEC --target TARGET` with default options, so the counts agree."""
    from glmc import checkpoint
    from glmc.backends import get_backend
    from glmc.compiler import run_passes, trace_entries
    from glmc.ir import make_context
    from glmc.pipeline import pipeline

    loaded = checkpoint.load(spec, rope_ratio_as=rope_ratio_as)
    cfg = loaded.config
    ctx = make_context(target, max_seq_len=min(cfg["max_position_embeddings"], 2048), model_config=cfg)
    passes = pipeline(ctx)
    graphs = trace_entries(loaded.model, ctx, passes, get_backend(ctx.target).chunked_prefill_default)
    records = run_passes(graphs, ctx, passes)
    head = (f"{spec}: {loaded.source_layout} layout, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"heads {cfg['num_attention_heads']}/{cfg['num_key_value_heads']} kv, vocab {cfg['vocab_size']}")
    return "\n".join([head, *describe_records(records, full)])


def describe_artifact(path: Path) -> str:
    from glmc.artifact import read_manifest

    m = read_manifest(path, verify=False)
    cfg = m["model"]["config"]
    lines = [f"{path}: {m['source']['kind']} {m['source']['name']} -> target {m['target']}, dtype {m['dtype']}, "
             f"quant {m['quant']}, max_seq_len {m['max_seq_len']}",
             f"model: {m['model']['source_layout']} layout, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}"]
    text = m.get("text")
    if text:
        gen = {k: v for k, v in text.get("generation", {}).items() if k != "eos_token_id"}
        tok = (f"{text['kind']} tokenizer ({text['file']}), {len(text.get('specials', {}))} special tokens, "
               f"chat format {text['chat_format']}" if text.get("file") else "no tokenizer")
        lines.append(f"text: {tok}, eos ids {text.get('generation', {}).get('eos_token_id')}"
                     + (f", generation defaults {gen}" if gen else ""))
    for p in m["passes"]:
        lines.append(f"   {p['graph']:<8} {p['name']:<22} matches={p['matches']:<4} nodes {p['nodes_before']} -> {p['nodes_after']}")
    files = m["backend"].get("graphs", {})
    for graph, hist in m["backend"].get("op_histogram", {}).items():
        lines.append(f"   {files.get(graph, graph)}: {sum(hist.values())} nodes: {_hist_line(hist)}")
    lora = m["backend"].get("lora")
    if lora:
        lines.append(f"   run-time adapters: {lora['slots']} slots of rank <= {lora['rank']} on "
                     f"{len(lora['linears'])} decoder linears (Runtime.add_adapter, glmc serve --adapter)")
    if m["backend"].get("step_declined"):
        lines.append(f"   lean step graph declined ({m['backend']['step_declined']}): generation runs the extend graph")
    report = path / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        lines.append(f"compile: {r['seconds']} s, peak RSS {r['peak_rss_mb']} MiB; verify: {r['verify']}")
    return "\n".join(lines)
