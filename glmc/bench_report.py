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
    ax.axhline(1.0, color="k", lw=0.8, ls="--")     # above it: the data fit in cache, not a roofline
    ax.set(ylabel="fraction of roofline (above 1: fits in cache)", ylim=(0, max(1.05, *pf, *df) * 1.05),
           title="Fraction of the machine's roofline")
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


def _fraction(f: float, above: str) -> str:
    """A roofline fraction as a table cell; above 1 it is no fraction of a roofline, and says
    why (decode: the data was not streamed from memory; prefill: the peak probe read low)."""
    return f"{above} ({f:.0%})" if f > 1.0 else f"{f:.0%}"


def _tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables as (title, header, rows): one source for report.md and report.html."""
    res = report["results"]
    lengths = report["settings"]["prompt_lengths"]
    ctx = report["settings"]["contexts"]
    prefill, decode = [], []
    for name, r in res.items():
        if r.get("precision"):                  # a peer: the format it ran (Q4_0, int4, ...)
            name = f"{name} ({r['precision']})"
        if "error" in r:
            prefill.append([name, f"failed: {r['error']}"])
            decode.append([name, f"failed: {r['error']}"])
            continue
        cells = [f"{p['seconds']['median'] * 1e3:.1f} [{p['seconds']['min'] * 1e3:.1f}, {p['seconds']['max'] * 1e3:.1f}]"
                 for p in (r["prefill"][str(L)] for L in lengths)]
        prefill.append([name, *cells, _fraction(r["prefill"][str(lengths[-1])]["peak_fraction"], "above the measured peak")])
        cells = [f"{d['tokens_per_s']:.1f} [{1 / d['seconds_per_token']['max']:.1f}, {1 / d['seconds_per_token']['min']:.1f}]"
                 for d in (r["decode"][str(C)] for C in ctx)]
        decode.append([name, *cells, _fraction(r["decode"][str(ctx[0])]["roofline_fraction"], "fits in cache")])
    tables = [("Prefill (latency = time to first token; median [min, max] ms)",
               ["provider", *(f"{L} tokens" for L in lengths), "% of matmul peak"], prefill),
              ("Decode (tokens/s, median [min, max])",
               ["provider", *(f"ctx {C}" for C in ctx), "% of bandwidth roofline"], decode)]
    if report["speedup_glmc_over"]:
        g = res["glmc"]

        def spread(baseline, kind, at, field):
            """[lowest, highest] ratio the two providers' repeats allow: the noise beside a ratio."""
            b, ours = res[baseline][kind][at][field], g[kind][at][field]
            return f"[{b['min'] / ours['max']:.2f}, {b['max'] / ours['min']:.2f}]"

        def paired(r, kind, at):
            """The repeats' paired ratios (a peer timed in turn with glmc), where the report has them."""
            p = r.get(f"{kind}_paired", {}).get(at)
            return f"; paired {p['median']:.2f}x [{p['min']:.2f}, {p['max']:.2f}]" if p else ""

        rows = []
        for name, r in report["speedup_glmc_over"].items():
            rows.append([name, ", ".join(f"{L}: {v:.2f}x {spread(name, 'prefill', L, 'seconds')}"
                                         f"{paired(r, 'prefill', L)}" for L, v in r["prefill"].items()),
                         ", ".join(f"ctx {C}: {v:.2f}x {spread(name, 'decode', C, 'seconds_per_token')}"
                                   f"{paired(r, 'decode', C)}" for C, v in r["decode"].items())])
        tables.append(("glmc speedup (ratio of medians [lowest, highest the repeats allow]; for peers timed in "
                       "turn with glmc, the ratios of the repeats paired: median [min, max]; measured in this run)",
                       ["baseline", "prefill", "decode"], rows))
    bd = report.get("decode_op_breakdown_ms", {})
    if bd and "error" not in bd:
        tables.append(("One decode step, per op type (ms)", ["op", "ms"],
                       [[k, f"{v:.3f}"] for k, v in list(bd.items())[:12]]))
    return tables


def _intro(report: dict) -> list[str]:
    m, a = report["machine"], report["artifact"]
    return [
        f"Machine: {m['cpu']}, {m['threads']} threads, {m['os']}; read bandwidth {m['read_bandwidth_gbs']} GB/s, "
        f"fp32 matmul {m['fp32_matmul_tflops'] * 1e3:.0f} GFLOP/s. Versions: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"Artifact: target {a['target']}, {a['dtype']}, quant {a['quant']}, {a['artifact_bytes'] / 2**20:.1f} MiB "
        f"(weights {a['weights_bytes'] / 2**20:.1f} MiB); {report['model']['parameters'] / 1e6:.1f}M parameters. "
        f"Peak RSS of the bench process {report['peak_rss_mb']:.0f} MiB.",
    ]


def markdown(report: dict) -> str:
    lines = [f"# glmc bench: {report['target']}", ""]
    for paragraph in _intro(report):
        lines += [paragraph, ""]
    for title, header, rows in _tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def _row_html(row: list[str], width: int) -> str:
    """One table row; a short row (a failed provider) spans its last cell over the rest."""
    cells = [f"<td>{html.escape(c)}</td>" for c in row[:-1]]
    span = width - len(row) + 1
    cells.append(f"<td colspan='{span}'>{html.escape(row[-1])}</td>" if span > 1 else f"<td>{html.escape(row[-1])}</td>")
    return "<tr>" + "".join(cells) + "</tr>"


def html_page(report: dict, plots: list[tuple[str, str]]) -> str:
    """report.html: the same paragraphs and tables as report.md, as HTML, then the plots."""
    e = html.escape
    parts = [f"<h1>glmc bench: {e(report['target'])}</h1>", *(f"<p>{e(p)}</p>" for p in _intro(report))]
    for title, header, rows in _tables(report):
        head = "".join(f"<th>{e(h)}</th>" for h in header)
        body = "".join(_row_html(row, len(header)) for row in rows)
        parts.append(f"<h2>{e(title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts += [f"<h2>{e(t)}</h2><img src='{n}' alt='{e(t)}'>" for n, t in plots]
    return ("<!doctype html><meta charset='utf-8'><title>glmc bench</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}</style>" + "".join(parts))


def write_report(report: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out_dir / "report.md").write_text(md)
    plots = _plots(report, out_dir)
    (out_dir / "report.html").write_text(html_page(report, plots))
