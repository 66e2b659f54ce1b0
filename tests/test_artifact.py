"""Artifact integrity: hashes and format version are checked on load."""

from __future__ import annotations

import json
import shutil

import pytest

import glmc
from glmc.errors import GlmcError


@pytest.fixture()
def art(artifacts, tmp_path):
    dst = tmp_path / "copy.glmc"
    shutil.copytree(artifacts("tiny-glm"), dst)
    return dst


def test_loads_and_generates(art):
    assert len(glmc.load(art).generate([[5, 6]], max_new_tokens=3)[0]) == 3


def test_tampered_weights_are_refused(art):
    w = art / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(GlmcError, match="weights.safetensors does not match its sha256"):
        glmc.load(art)


def test_truncated_file_is_refused(art):
    p = art / "step.onnx"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(GlmcError, match="step.onnx does not match"):
        glmc.load(art)


def test_missing_file_is_refused(art):
    (art / "score.onnx").unlink()
    with pytest.raises(GlmcError, match="score.onnx listed in the manifest is missing"):
        glmc.load(art)


def test_future_format_version_is_refused(art):
    m = json.loads((art / "manifest.json").read_text())
    m["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GlmcError, match="format version 99"):
        glmc.load(art)


def test_manifest_path_escape_is_refused(art):
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = "0" * 64
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GlmcError, match="escapes the artifact"):
        glmc.load(art)


def test_no_verify_skips_hashes(art):
    w = art / "tokenizer.json"
    w.write_text(w.read_text() + " ")
    with pytest.raises(GlmcError):
        glmc.load(art)
    assert glmc.load(art, verify=False).generate([[5]], max_new_tokens=1)
