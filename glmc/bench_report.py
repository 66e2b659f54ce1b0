"""Write a `glmc bench` report: report.json, report.md (tables) and report.html with PNG plots."""

from __future__ import annotations

import html
import json
from pathlib import Path


def _ok(results):
    return {k: v for k, v in results.items() if "error" not in v}


def _plots(report: dict, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = _ok(report["results"])
    made = []

    def save(fig, name, title):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((name, title))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in res.items():
        xs = [int(L) for L in r["prefill"]]
        ax.plot(xs, [r["prefill"][str(L)]["seconds"]["median"] * 1e3 for L in xs], marker="o", label=name)
    ax.set(xlabel="prompt tokens", ylabel="prefill latency (ms, median)", xscale="log", yscale="log",
           title="Prefill latency vs prompt length")
    ax.legend()
    save(fig, "prefill_latency.png", "Prefill latency vs prompt length")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in res.items():
        xs = [int(C) for C in r["decode"]]
        ax.plot(xs, [r["decode"][str(C)]["tokens_per_s"] for C in xs], marker="o", label=name)
    ax.set(xlabel="context tokens", ylabel="decode tokens/s (median)", xscale="log", title="Decode speed vs context")
    ax.legend()
    save(fig, "decode_tps.png", "Decode tokens/s vs context")

    ratios = report["speedup_glmc_over"]
    if ratios:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(ratios)
        pre = [max(ratios[n]["prefill"].values()) for n in names]
        dec = [max(ratios[n]["decode"].values()) for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], pre, 0.4, label="prefill (longest prompt)")
        ax.bar([i + 0.2 for i in x], dec, 0.4, label="decode (best context)")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(x), names)
        ax.set(ylabel="glmc speedup (x)", title="glmc speedup per baseline")
        ax.legend()
        save(fig, "speedup.png", "Speedup over each baseline")

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(res)
    pf = [max(v["peak_fraction"] for v in res[n]["prefill"].values()) for n in names]
    df = [max(v["roofline_fraction"] for v in res[n]["decode"].values()) for n in names]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], pf, 0.4, label="prefill: FLOP/s / matmul peak")
    ax.bar([i + 0.2 for i in x], df, 0.4, label="decode: bytes/s / read bandwidth")
    ax.set_xticks(list(x), names)
    ax.set(ylabel="fraction of roofline", ylim=(0, 1.05), title="Fraction of the machine's roofline")
    ax.legend()
    save(fig, "roofline.png", "Roofline fraction")

    bd = report.get("decode_op_breakdown_ms", {})
    if bd and "error" not in bd:
        items = list(bd.items())[:12]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1])
        ax.set(xlabel="ms per decode step", title="Per-op time of one glmc decode step")
        save(fig, "decode_ops.png", "Per-op breakdown of one decode step")
    return made


def markdown(report: dict) -> str:
    m, a = report["machine"], report["artifact"]
    lines = [
        f"# glmc bench: {report['target']}",
        "",
        f"Machine: {m['cpu']}, {m['threads']} threads, {m['os']}; read bandwidth {m['read_bandwidth_gbs']} GB/s, "
        f"fp32 matmul {m['fp32_matmul_tflops'] * 1e3:.0f} GFLOP/s. Versions: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
        f"Artifact: target {a['target']}, {a['dtype']}, quant {a['quant']}, {a['artifact_bytes'] / 2**20:.1f} MiB "
        f"(weights {a['weights_bytes'] / 2**20:.1f} MiB); {report['model']['parameters'] / 1e6:.1f}M parameters. "
        f"Peak RSS of the bench process {report['peak_rss_mb']:.0f} MiB.",
        "",
        "## Prefill (latency = time to first token; median [min, max] ms)",
        "",
    ]
    res = report["results"]
    lengths = report["settings"]["prompt_lengths"]
    lines.append("| provider | " + " | ".join(f"{L} tokens" for L in lengths) + " | % of matmul peak |")
    lines.append("|---" * (len(lengths) + 2) + "|")
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |")
            continue
        cells = [f"{p['seconds']['median'] * 1e3:.1f} [{p['seconds']['min'] * 1e3:.1f}, {p['seconds']['max'] * 1e3:.1f}]"
                 for p in (r["prefill"][str(L)] for L in lengths)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['prefill'][str(lengths[-1])]['peak_fraction']:.0%} |")
    ctx = report["settings"]["contexts"]
    lines += ["", "## Decode (tokens/s, median [min, max])", "",
              "| provider | " + " | ".join(f"ctx {C}" for C in ctx) + " | % of bandwidth roofline |",
              "|---" * (len(ctx) + 2) + "|"]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |")
            continue
        cells = []
        for C in ctx:
            d = r["decode"][str(C)]
            s = d["seconds_per_token"]
            cells.append(f"{d['tokens_per_s']:.1f} [{1 / s['max']:.1f}, {1 / s['min']:.1f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['decode'][str(ctx[0])]['roofline_fraction']:.0%} |")
    if report["speedup_glmc_over"]:
        lines += ["", "## glmc speedup (ratio of medians, measured in this run)", "",
                  "| baseline | prefill | decode |", "|---|---|---|"]
        for name, r in report["speedup_glmc_over"].items():
            lines.append(f"| {name} | " + ", ".join(f"{L}: {v:.2f}x" for L, v in r["prefill"].items())
                         + " | " + ", ".join(f"ctx {C}: {v:.2f}x" for C, v in r["decode"].items()) + " |")
    bd = report.get("decode_op_breakdown_ms", {})
    if bd and "error" not in bd:
        lines += ["", "## One decode step, per op type (ms)", "", "| op | ms |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in list(bd.items())[:12]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out_dir / "report.md").write_text(md)
    plots = _plots(report, out_dir)
    body = "".join(f"<h2>{html.escape(t)}</h2><img src='{n}' alt='{html.escape(t)}'>" for n, t in plots)
    (out_dir / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>glmc bench</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}</style>"
        f"<pre>{html.escape(md)}</pre>{body}")
