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
    (art / "step.onnx").unlink()
    with pytest.raises(GlmcError, match="step.onnx listed in the manifest is missing"):
        glmc.load(art)


@pytest.mark.parametrize("version", [99, 2, "4", None])
def test_other_format_versions_are_refused(art, version):
    m = json.loads((art / "manifest.json").read_text())
    m["format_version"] = version
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GlmcError, match=f"format version {version!r}; this glmc reads versions 3, 4"):
        glmc.load(art)


def test_format_3_is_still_read(art):
    """Format 3 differs only in carrying a score entry beside the step graph (used when there)."""
    m = json.loads((art / "manifest.json").read_text())
    assert m["format_version"] == 4 and "score" not in m["backend"]["graphs"]
    m["format_version"] = 3
    (art / "manifest.json").write_text(json.dumps(m))
    assert len(glmc.load(art).generate([[5, 6]], max_new_tokens=3)[0]) == 3


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
