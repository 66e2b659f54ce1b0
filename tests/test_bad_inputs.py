"""Table-driven bad-input suite: each broken checkpoint is refused with one error that
names the problem, and nothing is left at the output path."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from glmc.artifact import read_manifest
from glmc.cli import main
from glmc.errors import GlmcError
from glmc.safetensors_check import read_header
from tests.conftest import VARIANTS, make_hf_model


def _st_file(path: Path, header: dict, data: bytes = b"", raw_header: bytes | None = None):
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _valid(tmp: Path) -> Path:
    ckpt = tmp / "ckpt"
    make_hf_model(VARIANTS["glm-gqa"]).save_pretrained(ckpt)
    return ckpt


def _weights(ckpt):
    return ckpt / "model.safetensors"


def _edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _drop_tensor(ckpt, name, extra=None):
    from safetensors.torch import load_file, save_file

    t = load_file(_weights(ckpt))
    t.pop(name, None)
    if extra:
        t.update(extra)
    save_file(t, str(_weights(ckpt)))


def _set_tensor(ckpt, name, fn):
    from safetensors.torch import load_file, save_file

    t = load_file(_weights(ckpt))
    t[name] = fn(t[name])
    save_file(t, str(_weights(ckpt)))


def _index(ckpt, shard):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))


def _symlink_out(ckpt):
    outside = ckpt.parent / "elsewhere.safetensors"
    os.rename(_weights(ckpt), outside)
    os.symlink(outside, _weights(ckpt))


CASES = {
    "file shorter than 8 bytes": (lambda c: _weights(c).write_bytes(b"\x01\x02"), "shorter than the 8-byte"),
    "header length beyond the file": (lambda c: _weights(c).write_bytes(struct.pack("<Q", 10**6) + b"{}"),
                                      "runs past the"),
    "header beyond 100 MB": (lambda c: _weights(c).write_bytes(struct.pack("<Q", 200 * 2**20) + b"{}"), "100 MB"),
    "git-LFS pointer": (lambda c: _weights(c).write_bytes(
        struct.pack("<Q", 40) + b"version https://git-lfs.github.com/spec/v1"), "git-LFS pointer or an HTML page"),
    "HTML page": (lambda c: _weights(c).write_bytes(struct.pack("<Q", 20) + b"<html><body>404</body>"),
                  "git-LFS pointer or an HTML page"),
    "header not JSON": (lambda c: _st_file(_weights(c), {}, raw_header=b"{not json"), "not valid JSON"),
    "unknown dtype": (lambda c: _st_file(_weights(c), {"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}},
                                         b"\0" * 4), "unknown dtype"),
    "out-of-range offsets": (lambda c: _st_file(_weights(c), {"a": {"dtype": "F32", "shape": [4],
                                                                    "data_offsets": [0, 16]}}, b"\0" * 8),
                             "outside the 8-byte data section"),
    "overlapping offsets": (lambda c: _st_file(_weights(c), {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlaps"),
    "trailing bytes": (lambda c: _st_file(_weights(c), {"a": {"dtype": "F32", "shape": [1],
                                                              "data_offsets": [0, 4]}}, b"\0" * 9),
                       "bytes after the last tensor"),
    "size not shape x dtype": (lambda c: _st_file(_weights(c), {"a": {"dtype": "F32", "shape": [3],
                                                                      "data_offsets": [0, 8]}}, b"\0" * 8),
                               "needs 12"),
    "index path escapes with ..": (lambda c: _index(c, "../x.safetensors"), "escapes the checkpoint"),
    "index absolute path": (lambda c: _index(c, "/etc/passwd"), "escapes the checkpoint"),
    "index names a missing shard": (lambda c: _index(c, "model-00009.safetensors"), "which is missing"),
    "weights symlinked out of the checkpoint": (_symlink_out, "link out of the checkpoint"),
    "missing config.json": (lambda c: (c / "config.json").unlink(), "config.json: missing"),
    "config.json not JSON": (lambda c: (c / "config.json").write_text("{oops"), "not valid JSON"),
    "unknown model_type": (lambda c: _edit_config(c, model_type="llama"), "model_type 'llama' is not supported"),
    "heads not dividing kv heads": (lambda c: _edit_config(c, num_key_value_heads=3), "not a multiple of"),
    "negative layer count": (lambda c: _edit_config(c, num_hidden_layers=-1), "num_hidden_layers must be"),
    "unsupported activation": (lambda c: _edit_config(c, hidden_act="relu"), "hidden_act"),
    "odd rotary dim": (lambda c: _edit_config(c, rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.15625,
                                                                  "rope_type": "default"}), "rotary dim"),
    "unsupported rope scaling": (lambda c: _edit_config(c, rope_parameters={"rope_theta": 1e4, "rope_type": "yarn",
                                                                            "factor": 2.0}), "rope_type"),
    "config vocab contradicts tensors": (lambda c: _edit_config(c, vocab_size=999), "config implies"),
    "missing tensor": (lambda c: _drop_tensor(c, "model.norm.weight"), "missing tensors model.norm.weight"),
    "unexpected tensor": (lambda c: _drop_tensor(c, "", {"model.extra.weight": __import__("torch").zeros(2)}),
                          "unexpected tensors model.extra.weight"),
    "NaN in a weight": (lambda c: _set_tensor(c, "model.norm.weight", lambda t: t * float("nan")),
                        "model.norm.weight' contains NaN or Inf"),
    "integer weight": (lambda c: _set_tensor(c, "model.norm.weight", lambda t: t.long()), "non-float dtype"),
    "only pickle weights": (lambda c: (_weights(c).unlink(), (c / "pytorch_model.bin").write_bytes(b"x")),
                            "safetensors only"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_one_clear_error(case, tmp_path):
    ckpt = _valid(tmp_path)
    mutate, message = CASES[case]
    mutate(ckpt)
    out = tmp_path / "out.glmc"
    r = CliRunner().invoke(main, ["compile", str(ckpt), "-o", str(out), "--max-seq-len", "16"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("glmc: error:") and message in lines[0], lines
    assert not out.exists() and not list(tmp_path.glob(".out.glmc.tmp-*"))


def test_both_bin_and_safetensors_uses_safetensors_silently(tmp_path):
    from glmc.checkpoint import load

    ckpt = _valid(tmp_path)
    (ckpt / "pytorch_model.bin").write_bytes(b"garbage that must never be unpickled")
    assert load(ckpt).source["kind"] == "checkpoint"


def test_python_files_in_a_checkpoint_are_never_imported(tmp_path):
    from glmc.checkpoint import load

    ckpt = _valid(tmp_path)
    marker = tmp_path / "imported"
    for name in ("modeling_glm.py", "configuration_chatglm.py", "__init__.py"):
        (ckpt / name).write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_config(ckpt, auto_map={"AutoModel": "modeling_glm.GlmModel"})
    load(ckpt)
    assert not marker.exists()


def test_unwritable_output_directory_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores directory permissions (root)")
        r = CliRunner().invoke(main, ["compile", "tiny-glm", "-o", str(ro / "x.glmc"), "--max-seq-len", "16"])
        assert r.exit_code == 2 and "cannot write the artifact here" in r.output
    finally:
        ro.chmod(0o700)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_safetensors_header(tmp_path_factory, blob):
    """Any bytes: a parsed header or GlmcError, never another exception (300 examples in CI)."""
    p = tmp_path_factory.mktemp("fz") / "x.safetensors"
    p.write_bytes(blob)
    try:
        read_header(p)
    except GlmcError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["format_version", "files", "target", "model", "x"]), json_values, max_size=5)
       | st.binary(max_size=200))
def test_fuzz_manifest(tmp_path_factory, content):
    """Any manifest: a loaded dict or GlmcError, never another exception (300 examples in CI)."""
    d = tmp_path_factory.mktemp("mf")
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (d / "manifest.json").write_bytes(data)
    try:
        read_manifest(d)
    except GlmcError:
        pass


def test_config_dtype_contradicting_tensors_is_a_warning(tmp_path):
    from glmc.checkpoint import load
    from glmc.errors import GlmcWarning

    ckpt = _valid(tmp_path)
    _edit_config(ckpt, torch_dtype="bfloat16", dtype="bfloat16")     # tensors are float32
    with pytest.warns(GlmcWarning, match=r"dtype bfloat16 contradicts the tensors \(float32\)"):
        loaded = load(ckpt)
    assert loaded.warnings and "contradicts" in loaded.warnings[0]


def test_cli_prints_a_warning_as_one_line(tmp_path):
    ckpt = _valid(tmp_path)
    _edit_config(ckpt, torch_dtype="bfloat16", dtype="bfloat16")
    r = subprocess.run([sys.executable, "-m", "glmc.cli", "inspect", str(ckpt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "contradicts" in ln]
    assert len(lines) == 1 and lines[0].startswith("glmc: warning: ") and "Warning:" not in lines[0], r.stderr
