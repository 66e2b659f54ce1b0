"""Reliability: --allow-pickle through torch.load(weights_only=True), up-front memory
refusal, a compile killed with SIGKILL, and checks that do not rely on `assert`
(so they hold under python -O)."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import glmc
from glmc.cli import main
from glmc.errors import GlmcError
from tests.conftest import VARIANTS, make_hf_model
from tests.tolerances import TOLERANCES

ROOT = Path(__file__).resolve().parents[1]


def _pickle_checkpoint(tmp: Path) -> tuple[Path, torch.nn.Module]:
    model = make_hf_model(VARIANTS["glm-gqa"])
    ckpt = tmp / "ckpt"
    model.save_pretrained(ckpt)
    (ckpt / "model.safetensors").unlink()
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    return ckpt, model


def test_allow_pickle_loads_plain_tensors(tmp_path):
    ckpt, model = _pickle_checkpoint(tmp_path)
    with pytest.raises(GlmcError, match="--allow-pickle"):
        glmc.compile(ckpt, tmp_path / "a.glmc", max_seq_len=32)
    art = glmc.compile(ckpt, tmp_path / "a.glmc", max_seq_len=32, allow_pickle=True, verify=False,
                       chunked_prefill=False)
    ids = [5, 6, 7, 8]
    want = model(input_ids=torch.tensor([ids])).logits[0, -1].detach().numpy()
    got = glmc.load(art).logits(ids)[-1]
    assert abs(got - want).max() < TOLERANCES["artifact_consistency_fp32"]


class _Payload:
    """A pickle that would run code when unpickled by a full pickle loader."""

    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("GLMC_TEST_MARKER", "/nonexistent/x"),))


def test_allow_pickle_never_runs_pickled_code(tmp_path, monkeypatch):
    ckpt, _ = _pickle_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("GLMC_TEST_MARKER", str(marker))
    torch.save({"model.embed_tokens.weight": _Payload()}, ckpt / "pytorch_model.bin")
    r = CliRunner().invoke(main, ["compile", str(ckpt), "--allow-pickle", "-o", str(tmp_path / "x.glmc")])
    assert r.exit_code == 2 and "refused by torch.load(weights_only=True)" in r.output, r.output
    assert not marker.exists() and not (tmp_path / "x.glmc").exists()


def test_model_too_large_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMC_MEMORY_LIMIT_GB", "0.5")
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["compile", "glm-1b", "-o", str(tmp_path / "big.glmc")])
    assert r.exit_code == 2, r.output
    assert "glm-1b: compiling needs about" in r.output and "0.5 GiB available" in r.output
    assert time.perf_counter() - t0 < 5          # before building a 1B-parameter model
    assert not (tmp_path / "big.glmc").exists()


def test_count_parameters_matches_transformers():
    from glmc.checkpoint import count_parameters, load

    for name in ("tiny-glm", "small-glm"):
        loaded = load(name)
        assert count_parameters(dict(loaded.config, model_type="glm")) == sum(
            p.numel() for p in loaded.model.parameters())


def test_sigkill_mid_compile_leaves_target_untouched(tmp_path, artifacts):
    """kill -9 while compiling over an existing artifact: the old artifact stays, intact."""
    import shutil

    target = tmp_path / "t.glmc"
    shutil.copytree(artifacts("tiny-glm"), target)
    before = (target / "manifest.json").read_text()
    proc = subprocess.Popen([sys.executable, "-m", "glmc.cli", "compile", "tiny-glm", "-o", str(target),
                             "--quant", "int8", "--max-seq-len", "32"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".t.glmc.tmp-*/*")):    # staging under way
        time.sleep(0.05)
    assert proc.poll() is None, "compile finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (target / "manifest.json").read_text() == before
    assert json.loads(before)["quant"] == "none"
    glmc.load(target)                           # sha256 of every file still matches
    assert not list(tmp_path.glob(".t.glmc.old-*"))


def test_no_validation_through_assert():
    """Every check in glmc's code is an explicit raise: `python -O` strips asserts."""
    found = []
    for pkg in ("glmc", "passes", "backends"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Assert):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_bad_input_refused_under_python_O(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_hf_model(VARIANTS["glm-gqa"]).save_pretrained(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_attention_heads"] = 5          # does not divide hidden 64 with head_dim 16 shapes
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-O", "-m", "glmc.cli", "compile", str(ckpt), "-o", str(tmp_path / "o.glmc")],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("glmc: error:") and "Traceback" not in r.stderr
    assert not (tmp_path / "o.glmc").exists()
