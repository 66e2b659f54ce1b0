"""Autotuner and tuning database: deterministic fake timers, database keys, reuse,
concurrency and corruption handling, `glmc tune` and `compile --tune` on the CPU target."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import glmc
from glmc.autotune import DeviceKey, Tuner, TuningDB, entry_key
from glmc.backends.cpu.tune import choose_chunk, token_counts
from glmc.backends.gpu import tune as gpu_tune
from glmc.cli import main
from glmc.errors import GlmcWarning

DEV = DeviceKey("Test GPU", "sm_90", "cuda 12.4", "3.9.0")


class FakeClock:
    """Time advances only when a candidate runs, by that candidate's cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def run(self, cost):
        def go():
            self.now += cost
        return go


def _tuner(db, clock, device=DEV, budget=1e9):
    return Tuner(db, device, budget_s=budget, timer=clock, clock=clock, repeats=3)


def test_fastest_candidate_wins_and_is_recorded(tmp_path):
    clock = FakeClock()
    db = TuningDB(tmp_path / "t.json")
    t = _tuner(db, clock)
    r = t.choose("matmul", (128, 4096, 4096), "fp16", "int4",
                 {"a": clock.run(3e-3), "b": clock.run(1e-3), "torch": clock.run(2e-3)})
    assert r["choice"] == "b" and r["timings"] == pytest.approx({"a": 3e-3, "b": 1e-3, "torch": 2e-3})
    t.save()
    stored = db.get(entry_key(DEV, "matmul", (128, 4096, 4096), "fp16", "int4"))
    assert stored["choice"] == "b"


def test_second_tune_on_same_device_measures_nothing(tmp_path):
    clock = FakeClock()
    db = TuningDB(tmp_path / "t.json")
    cands = {"a": clock.run(2.0), "b": clock.run(1.0)}
    first = _tuner(db, clock)
    first.choose("matmul", (1, 64, 64), "fp16", "none", cands)
    first.save()
    again = _tuner(db, clock)
    before = clock.now
    assert again.choose("matmul", (1, 64, 64), "fp16", "none", cands)["choice"] == "b"
    assert again.measured == 0 and again.reused == 1 and clock.now == before


@pytest.mark.parametrize("other", [
    DeviceKey("Other GPU", "sm_90", "cuda 12.4", "3.9.0"), DeviceKey("Test GPU", "sm_80", "cuda 12.4", "3.9.0"),
    DeviceKey("Test GPU", "sm_90", "cuda 12.6", "3.9.0"), DeviceKey("Test GPU", "sm_90", "cuda 12.4", "3.6.0"),
])
def test_entries_from_another_device_arch_or_version_are_never_reused(tmp_path, other):
    clock = FakeClock()
    db = TuningDB(tmp_path / "t.json")
    t = _tuner(db, clock)
    t.choose("matmul", (1, 64, 64), "fp16", "none", {"a": clock.run(1.0)})
    t.save()
    t2 = _tuner(db, clock, device=other)
    t2.choose("matmul", (1, 64, 64), "fp16", "none", {"a": clock.run(1.0)})
    assert t2.measured == 1 and t2.reused == 0


def test_key_separates_op_shape_dtype_quant():
    keys = {entry_key(DEV, op, shape, dt, q) for op in ("matmul", "attention") for shape in ((1, 2), (2, 1))
            for dt in ("fp16", "bf16") for q in ("none", "int4")}
    assert len(keys) == 16


def test_budget_bounds_the_search(tmp_path):
    clock = FakeClock()
    t = _tuner(None, clock, budget=5.0)
    r = t.choose("matmul", (1, 8, 8), "fp16", "none", {f"c{i}": clock.run(1.0) for i in range(10)})
    assert len(r["timings"]) < 10 and not r["complete"] and r["timings"]


def test_cache_flush_runs_between_repeats(tmp_path):
    clock, flushes = FakeClock(), []
    _tuner(None, clock).choose("gemv", (1, 8, 8), "fp16", "int4", {"a": clock.run(1.0)},
                               flush=lambda: flushes.append(1))
    assert len(flushes) == 3


@pytest.mark.parametrize("content", [b"{not json", b"\x00\xff" * 10, b'{"version": 99, "entries": {}}', b"[]"])
def test_corrupt_or_foreign_database_is_ignored_and_rebuilt(tmp_path, content):
    path = tmp_path / "t.json"
    path.write_bytes(content)
    db = TuningDB(path)
    with pytest.warns(GlmcWarning, match="ignoring it, it will be rebuilt"):
        assert db.get("anything") is None
    assert db.update({"k": {"choice": "a"}})
    assert json.loads(path.read_text()) == {"version": 1, "entries": {"k": {"choice": "a"}}}


def test_unwritable_location_warns_and_changes_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    db = TuningDB(blocker / "glmc" / "t.json")            # parent is a file: cannot create the directory
    with pytest.warns(GlmcWarning, match="cannot write the tuning database"):
        assert db.update({"k": {"choice": "a"}}) is False


def test_full_disk_leaves_the_old_database_intact(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    db = TuningDB(path)
    db.update({"old": {"choice": "a"}})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.warns(GlmcWarning, match="No space left on device"):
        assert db.update({"new": {"choice": "b"}}) is False
    assert TuningDB(path).entries() == {"old": {"choice": "a"}}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".t.json.")] == []


def _writer(path: str, tag: str, n: int) -> None:
    db = TuningDB(Path(path))
    for i in range(n):
        db.update({f"{tag}-{i}": {"choice": tag}})


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "t.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), tag, 60)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries = TuningDB(path).entries()
    assert len(entries) == 120 and {v["choice"] for v in entries.values()} == {"a", "b"}


def test_choose_chunk_picks_smallest_efficient_token_count():
    assert choose_chunk({16: 100.0, 32: 180.0, 64: 196.0, 128: 200.0, 256: 199.0}) == 64
    assert choose_chunk({16: 10.0}) == 16
    assert token_counts(300) == [16, 32, 64, 128, 256]


def test_glmc_tune_cpu_artifact_and_report(artifacts, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    art = tmp_path / "a.glmc"
    shutil.copytree(artifacts("tiny-glm"), art)
    r = CliRunner().invoke(main, ["tune", str(art), "--report", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "0 reused" in r.output
    tuning = json.loads((art / "tuning.json").read_text())
    assert tuning["threads"] >= 1 and str(tuning["prefill_chunk"]) in tuning["prefill_tokens_per_s"]
    assert (tmp_path / "rep" / "matmul_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "xdg" / "glmc" / "tuning.json").is_file()
    glmc.load(art)                                      # manifest rewritten: every sha256 still matches
    r = CliRunner().invoke(main, ["tune", str(art)])
    assert r.exit_code == 0 and " 0 measured" in r.output, r.output


def test_two_compiles_share_one_tuning_database(checkpoints, tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    outs = [tmp_path / "a.glmc", tmp_path / "b.glmc"]
    models = ["tiny-glm", str(checkpoints("glm-gqa"))]
    procs = [subprocess.Popen([sys.executable, "-m", "glmc.cli", "compile", m, "-o", str(o), "--tune",
                               "--no-verify", "--no-chunked-prefill", "--max-seq-len", "64"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for m, o in zip(models, outs)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    entries = TuningDB(tmp_path / "xdg" / "glmc" / "tuning.json").entries()
    hidden = {json.loads((o / "manifest.json").read_text())["model"]["config"]["hidden_size"] for o in outs}
    for h in hidden:        # both models' measurements landed
        assert any(f"|cpu_prefill|{h}x" in k for k in entries), (h, list(entries)[:4])
    for o in outs:
        glmc.load(o)
        assert json.loads((o / "tuning.json").read_text())["threads"] >= 1


def test_gpu_artifact_tuning_flow_in_the_interpreter(artifacts, tmp_path, monkeypatch):
    """`glmc tune` on a --target cuda artifact: every kernel shape gets candidates from its
    config space (+ torch for matmuls), wrong configs are dropped, choices land in the
    manifest and the AOT binaries are rebuilt for them. A fake timer makes the choice
    deterministic: the interpreter's timings mean nothing."""
    import shutil

    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU this flow runs for real in tests/gpu")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    art = tmp_path / "g.glmc"
    shutil.copytree(artifacts("glm-gqa", target="cuda:sm_90"), art)
    clock = FakeClock()
    manifest = json.loads((art / "manifest.json").read_text())

    def timer():            # every measured call costs 1 ms of fake time
        clock.now += 5e-4
        return clock.now

    result = gpu_tune.tune_gpu(art, manifest, budget_s=1e9, db=TuningDB(tmp_path / "db.json"), timer=timer,
                               clock=clock, repeats=1, max_candidates=2, prompt_tokens=(8,))
    ops = {k.split(":")[0] for k in result["configs"]}
    assert {"rms_norm", "rotary", "swiglu", "attention", "matmul"} <= ops
    assert result["tuned"] == result["shapes"] and result["measured"] == result["shapes"]
    gpu_tune.apply_gpu_tuning(art, manifest, result["configs"])
    from glmc.artifact import write_manifest

    write_manifest(art, manifest)
    rt = glmc.load(art)                              # hashes rewritten; the tuned configs run
    assert rt.manifest["backend"]["tuned_configs"] == result["configs"]
    index = json.loads((art / "kernels" / "index.json").read_text())
    assert index["archs"] == ["sm_90"] and not (art / ".kernels-new").exists()
    assert len(rt.generate([[5, 6, 7]], max_new_tokens=3, stop_at_eos=False)[0]) == 3


def _tune_gpu_with_broken_rms_norm(art, tmp_path, error):
    """Run tune_gpu with every rms_norm config but the default failing with `error`."""
    from glmc.backends.triton import rms_norm

    manifest = json.loads((art / "manifest.json").read_text())
    clock = FakeClock()
    real = rms_norm.rms_norm

    def broken(x, w, eps, residual=None, config=None):
        if config is not None:
            raise error
        return real(x, w, eps, residual=residual)

    def timer():
        clock.now += 5e-4
        return clock.now

    import unittest.mock

    with unittest.mock.patch.object(rms_norm, "rms_norm", broken):
        return gpu_tune.tune_gpu(art, manifest, budget_s=1e9, db=TuningDB(tmp_path / "db.json"), timer=timer,
                                 clock=clock, repeats=1, max_candidates=2, prompt_tokens=(8,))


def test_gpu_tuner_records_configs_the_compiler_rejects(artifacts, tmp_path):
    import torch
    from triton.runtime.errors import OutOfResources

    if torch.cuda.is_available():
        pytest.skip("on a GPU this flow runs for real in tests/gpu")
    result = _tune_gpu_with_broken_rms_norm(artifacts("glm-gqa", target="cuda:sm_90"), tmp_path,
                                            OutOfResources(300000, 232448, "shared memory"))
    rejected = {k: v for k, v in result["rejected"].items() if k.startswith("rms_norm:")}
    assert rejected and all("OutOfResources: out of resource: shared memory" in reason
                            for per_shape in rejected.values() for reason in per_shape.values())
    assert not any(k.startswith("rms_norm:") for k in result["configs"])     # nothing left to choose from


def test_gpu_tuner_does_not_hide_a_launcher_bug(artifacts, tmp_path):
    """A TypeError in a launcher is a glmc bug: it propagates instead of every config quietly
    'failing' and the tuner picking torch."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU this flow runs for real in tests/gpu")
    with pytest.raises(TypeError, match="launcher bug"):
        _tune_gpu_with_broken_rms_norm(artifacts("glm-gqa", target="cuda:sm_90"), tmp_path,
                                       TypeError("launcher bug"))
