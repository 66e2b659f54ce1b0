"""Validate a safetensors file's header before any library maps it.

The safetensors library already refuses most malformed files, but with messages
that do not name the file and, for some inputs, after allocating what the header
claims. This check reads only the header and the file size, and says exactly
what is wrong: it is what `glmc` runs on every checkpoint and artifact file.
"""

from __future__ import annotations

import json
import os
import struct

from glmc.errors import GlmcError

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


def read_header(path: str | os.PathLike) -> dict:
    """Return {name: {dtype, shape, data_offsets}} or raise GlmcError naming the problem."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise GlmcError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise GlmcError(f"{path}: not a safetensors file (claims a {n}-byte header, over the 100 MB limit)")
            if 8 + n > size:
                raise GlmcError(f"{path}: truncated or not a safetensors file (header of {n} bytes runs past the {size}-byte file)")
            raw = f.read(n)
    except OSError as e:
        raise GlmcError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" "))
    except (UnicodeDecodeError, json.JSONDecodeError):
        if raw[:32].lstrip().startswith((b"version https://git-lfs", b"<")):
            raise GlmcError(f"{path}: this is a git-LFS pointer or an HTML page, not the weights") from None
        raise GlmcError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise GlmcError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    spans = []
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise GlmcError(f"{path}: tensor '{name}' lacks dtype/shape/data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise GlmcError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise GlmcError(f"{path}: tensor '{name}' has invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise GlmcError(f"{path}: tensor '{name}' has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise GlmcError(f"{path}: tensor '{name}' offsets [{begin}, {end}] fall outside the {data_size}-byte data section")
        count = 1
        for d in shape:
            count *= d
        if count * DTYPE_BYTES[dtype] != end - begin:
            raise GlmcError(
                f"{path}: tensor '{name}' is {end - begin} bytes but shape {shape} x {dtype} needs {count * DTYPE_BYTES[dtype]}"
            )
        spans.append((begin, end, name))
        tensors[name] = info
    spans.sort()
    covered = 0
    for begin, end, name in spans:
        if begin < covered:
            raise GlmcError(f"{path}: tensor '{name}' overlaps the tensor before it")
        if begin > covered:
            raise GlmcError(f"{path}: {begin - covered} unused bytes before tensor '{name}'")
        covered = end
    if covered != data_size:
        raise GlmcError(f"{path}: {data_size - covered} bytes after the last tensor (trailing data or a gap)")
    return tensors


def data_start(path: str | os.PathLike) -> int:
    """Byte offset of the data section (8 + header length)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n
