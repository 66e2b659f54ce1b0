"""`glmc bench`: report schema, a failing baseline is reported not fatal, --quick stays quick."""

from __future__ import annotations

import json
import time

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
