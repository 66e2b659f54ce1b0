"""The NAME.glmc/ artifact: manifest, integrity, atomic writes.

An artifact is written into a temporary directory beside its target and renamed
into place only when every file is complete, so an interrupted compile leaves
nothing at the target and an existing artifact there untouched until the swap.
Loading checks the format version and the sha256 of every file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from glmc.errors import GlmcError

# 3: cpu artifacts generate through the lean step graph (else, declined, extend)
# 4: cpu step artifacts score (every position's logits) through the step graph: no score entry
FORMAT_VERSION = 4
READS = (3, 4)          # a version-3 artifact runs as before (its score entry is used)
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=file_hashes(root))
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staging_dir(target: Path):
    """Yield a temp dir beside `target`; on success swap it into place, else remove it."""
    target = Path(target)
    parent = target.resolve().parent
    if not parent.is_dir():
        raise GlmcError(f"{target}: parent directory {parent} does not exist")
    if target.exists() and not (target / MANIFEST).is_file():
        raise GlmcError(f"{target}: exists and is not a glmc artifact; refusing to replace it")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    except OSError as e:
        raise GlmcError(f"{parent}: cannot write the artifact here ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; an artifact is an ordinary directory
    try:
        yield tmp
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(root: Path, verify: bool = True) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise GlmcError(f"{root}: no such artifact directory")
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise GlmcError(f"{root}: not a glmc artifact (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GlmcError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise GlmcError(f"{path}: manifest is not a JSON object")
    version = manifest.get("format_version")
    if version not in READS:
        raise GlmcError(f"{path}: artifact format version {version!r}; this glmc reads versions "
                        f"{', '.join(map(str, READS))} (recompile it)")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise GlmcError(f"{path}: manifest has no file list")
    for rel in files:
        if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise GlmcError(f"{path}: file entry {rel!r} escapes the artifact")
    if verify:
        for rel, digest in files.items():
            p = root / rel
            if not p.is_file():
                raise GlmcError(f"{root}: file {rel} listed in the manifest is missing")
            if sha256_file(p) != digest:
                raise GlmcError(f"{root}: file {rel} does not match its sha256 in the manifest (modified or truncated)")
    return manifest
