"""`glmc bench`: report schema, a failing baseline is reported not fatal, --quick stays quick."""

from __future__ import annotations

import json
import time

import numpy as np

import pytest
from click.testing import CliRunner

import glmc.benchmark as benchmark
from glmc.cli import main


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory, artifacts):
    out = tmp_path_factory.mktemp("bench")
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["bench", str(artifacts("tiny-glm")), "--quick", "-o", str(out)],
                           catch_exceptions=False)
    return r, out, time.perf_counter() - t0


def test_quick_bench_writes_all_three_files(quick_report):
    r, out, _ = quick_report
    assert r.exit_code == 0, r.output
    for name in ("report.json", "report.md", "report.html", "prefill_latency.png", "decode_tps.png", "roofline.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


def test_report_schema(quick_report):
    _, out, _ = quick_report
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema_version"] == benchmark.SCHEMA_VERSION
    for key in ("cpu", "os", "threads", "read_bandwidth_gbs", "fp32_matmul_tflops", "versions"):
        assert key in rep["machine"]
    assert {"glmc", "torch", "onnxruntime", "triton"} <= set(rep["machine"]["versions"])
    assert set(rep["results"]) == {"glmc", "eager", "ort-plain"}
    g = rep["results"]["glmc"]
    for L in rep["settings"]["prompt_lengths"]:
        s = g["prefill"][str(L)]["seconds"]
        assert s["min"] <= s["median"] <= s["max"] and s["n"] == rep["settings"]["repeats"]
        assert 0 < g["prefill"][str(L)]["peak_fraction"]
    for C in rep["settings"]["contexts"]:
        assert g["decode"][str(C)]["tokens_per_s"] > 0 and g["decode"][str(C)]["roofline_fraction"] > 0
    assert set(rep["speedup_glmc_over"]) == {"eager", "ort-plain"}
    assert "error" not in rep["decode_op_breakdown_ms"] and rep["decode_op_breakdown_ms"]
    assert "| glmc |" in (out / "report.md").read_text()


def test_quick_stays_quick(quick_report):
    _, _, seconds = quick_report
    assert seconds < 60, f"--quick took {seconds:.0f} s"


def test_failing_baseline_is_reported_not_fatal(artifacts, tmp_path, monkeypatch):
    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("export exploded")

    monkeypatch.setattr(benchmark, "OrtPlainProvider", Broken)
    rep = benchmark.run(str(artifacts("tiny-glm")), tmp_path, quick=True, skip=("eager",), progress=False)
    assert rep["results"]["ort-plain"] == {"error": "RuntimeError: export exploded"}
    assert "error" not in rep["results"]["glmc"]
    assert "failed: RuntimeError: export exploded" in (tmp_path / "report.md").read_text()


def test_glmc_failure_is_fatal_with_a_nonzero_exit(artifacts, tmp_path, monkeypatch):
    """A report without glmc's numbers would be a wrong answer: glmc failing to agree with
    eager ends the run with one error line and exit status 2, and writes no report."""
    class Wrong(benchmark.GlmcProvider):
        def steps(self, state, n):
            return [t + 1 for t in super().steps(state, n)]

    monkeypatch.setattr(benchmark, "GlmcProvider", Wrong)
    r = CliRunner().invoke(main, ["bench", str(artifacts("tiny-glm")), "--quick", "--no-eager", "--no-ort",
                                  "-o", str(tmp_path / "rep")])
    assert r.exit_code == 2, r.output
    assert "greedy tokens differ from transformers eager" in r.output and "not timing a wrong answer" in r.output
    assert not (tmp_path / "rep" / "report.json").exists()


def test_quantized_artifact_is_checked_against_its_fp32_source(artifacts, tmp_path, monkeypatch):
    """An int4 artifact is gated like `glmc verify` (relative RMS vs the fp32 model) before timing;
    scrambled codes (a wrong packing) are refused."""
    import shutil

    from glmc.artifact import read_manifest, write_manifest

    art = tmp_path / "q.glmc"
    shutil.copytree(artifacts("tiny-glm", quant="int4"), art)
    rep = benchmark.run(str(art), tmp_path / "ok", quick=True, skip=("eager", "ort-plain"), progress=False)
    assert "error" not in rep["results"]["glmc"]
    # swap the nibbles of every packed (uint8) tensor in place: the file's layout is unchanged
    path = art / "weights.safetensors"
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    packed = [v["data_offsets"] for k, v in header.items() if k != "__metadata__" and v["dtype"] == "U8"]
    assert packed
    for a, b in packed:
        codes = np.frombuffer(bytes(data[8 + n + a:8 + n + b]), np.uint8)
        data[8 + n + a:8 + n + b] = ((codes >> 4) | (codes << 4)).astype(np.uint8).tobytes()
    path.write_bytes(bytes(data))
    write_manifest(art, read_manifest(art, verify=False))
    with pytest.raises(benchmark.GlmcError, match="disagrees with its fp32 source"):
        benchmark.run(str(art), tmp_path / "bad", quick=True, skip=("eager", "ort-plain"), progress=False)


def test_report_html_has_real_tables_and_marks_cache_resident_fractions(quick_report):
    """report.html renders the tables as HTML (not markdown inside <pre>), and a roofline
    fraction above 1 reads as "fits in cache", never as a percentage of a roofline."""
    from glmc.bench_report import html_page, markdown

    _, out, _ = quick_report
    page = (out / "report.html").read_text()
    assert "<pre>" not in page and "| glmc |" not in page
    assert page.count("<table>") >= 3 and "<td>glmc</td>" in page
    rep = json.loads((out / "report.json").read_text())
    C = str(rep["settings"]["contexts"][0])
    rep["results"]["glmc"]["decode"][C]["roofline_fraction"] = 1.72
    rep["results"]["eager"]["decode"][C]["roofline_fraction"] = 0.31
    for text in (markdown(rep), html_page(rep, [])):
        assert "fits in cache (172%)" in text and "31%" in text and "fits in cache (31%)" not in text
    # every speedup carries the range its repeats allow, and the median ratio lies in it
    L = str(rep["settings"]["prompt_lengths"][-1])
    v = rep["speedup_glmc_over"]["eager"]["prefill"][L]
    cell = markdown(rep).split("| eager | ")[-1].split(f"{L}: {v:.2f}x [")[1].split("]")[0]
    lo, hi = (float(x) for x in cell.split(", "))
    assert lo <= round(v, 2) <= hi
    rep["results"]["ort-plain"] = {"error": "RuntimeError: boom"}    # as a failed baseline reports
    del rep["speedup_glmc_over"]["ort-plain"]
    assert "colspan=" in html_page(rep, []) and "failed: RuntimeError: boom" in html_page(rep, [])


def _chromium():
    import shutil

    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _drawn(browser, page, shot):
    """The page as headless Chromium draws it: (pixels with long runs of the tables' #ccc cell
    borders, pixels of matplotlib's default blue)."""
    import subprocess

    import matplotlib.image as mpimg

    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1100,4000", page.as_uri()],
                   check=True, capture_output=True, timeout=180)
    img = mpimg.imread(str(shot))[..., :3]
    grey = np.all(np.abs(img - 0.8) < 0.02, axis=-1)
    blue = np.all(np.abs(img - np.array([0x1F, 0x77, 0xB4]) / 255) < 0.06, axis=-1)
    return int((grey.sum(axis=1) > 200).sum()), int(blue.sum())


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (apt-get install chromium): "
                                                "report.html is not drawn")
def test_report_html_as_headless_chromium_draws_it(quick_report, tmp_path):
    """report.html in a browser: the screenshot holds the tables' cell borders (real HTML tables,
    not markdown text) and the plots' bars (the PNGs load). The same report as markdown in
    <pre>, the page before issue 14, draws neither."""
    from glmc.bench_report import markdown

    _, out, _ = quick_report
    borders, bars = _drawn(_chromium(), out / "report.html", tmp_path / "page.png")
    assert borders >= 10 and bars >= 2000, (borders, bars)
    rep = json.loads((out / "report.json").read_text())
    old = out / "old.html"
    old.write_text("<!doctype html><meta charset='utf-8'><pre>" + markdown(rep) + "</pre>")
    assert _drawn(_chromium(), old, tmp_path / "old.png") == (0, 0)


def test_engines_are_timed_in_turn_each_repeat_not_one_after_another(monkeypatch):
    """measure_providers runs every engine once per repeat of each prompt length and context,
    the order rotating, so a change in the machine's state between repeats falls on all of
    them (a warm-up of each first); each engine's numbers are its own calls' times."""
    calls = []

    class Fake(benchmark.Provider):
        def __init__(self, name, seconds):
            self.name, self.seconds = name, seconds

        def prefill(self, ids):
            calls.append(("prefill", self.name))
            time.sleep(self.seconds)

        def start(self, ids):
            return {}

        def steps(self, state, n):
            calls.append(("steps", self.name))
            time.sleep(self.seconds * n)
            return [0] * n

    monkeypatch.setattr(benchmark, "SWITCH_PAUSE_S", 0.0)
    s = benchmark.Settings(prompt_lengths=[4], contexts=[8], decode_tokens=2, repeats=3, baselines=[])
    out = benchmark.measure_providers({"a": Fake("a", 0.001), "b": Fake("b", 0.02)}, list(range(16)), s)
    for kind in ("prefill", "steps"):
        order = [n for k, n in calls if k == kind]
        assert order == ["a", "b"] + ["a", "b"] + ["b", "a"] + ["a", "b"], order   # warm-up, then rotating
    assert out["a"]["prefill"]["4"]["seconds"]["max"] < 0.015 < out["b"]["prefill"]["4"]["seconds"]["min"]
    assert out["a"]["decode"]["8"]["seconds_per_token"]["n"] == 3
    assert out["b"]["decode"]["8"]["seconds_per_token"]["min"] > 0.015


def test_paired_ratios_compare_each_repeat_with_the_one_beside_it():
    """A host whose speed moved between repeats: glmc's three slow repeats and the peer's two
    make the ratio of medians say 0.55x; each repeat paired with the one beside it says 1.1x
    (and where the two engines' samples do not pair up, there is no paired ratio)."""
    glmc_times, peer_times = [1.0, 1.0, 2.0, 2.0, 2.0], [1.1, 1.1, 1.1, 2.2, 2.2]
    ours = dict(benchmark.summarize(glmc_times), samples=glmc_times)
    theirs = dict(benchmark.summarize(peer_times), samples=peer_times)
    assert theirs["median"] / ours["median"] == pytest.approx(0.55)
    p = benchmark.paired_ratios(theirs, ours)
    assert p["median"] == pytest.approx(1.1) and p["min"] == pytest.approx(0.55) and p["n"] == 5
    assert benchmark.paired_ratios(dict(theirs, samples=peer_times[:4]), ours) is None
    assert benchmark.paired_ratios({k: v for k, v in theirs.items() if k != "samples"}, ours) is None


def test_the_report_prints_a_peers_paired_ratios_beside_its_ratio(quick_report):
    from glmc.bench_report import markdown

    _, out, _ = quick_report
    rep = json.loads((out / "report.json").read_text())
    L = str(rep["settings"]["prompt_lengths"][-1])
    assert "; paired" not in markdown(rep)          # eager and ort-plain are timed one after another
    rep["speedup_glmc_over"]["eager"]["prefill_paired"] = {L: {"min": 1.02, "median": 1.1, "max": 1.25, "n": 3}}
    assert "; paired 1.10x [1.02, 1.25]" in markdown(rep).split("| eager | ")[-1].split("\n")[0]
