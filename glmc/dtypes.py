"""Every dtype glmc handles, in one table: its torch dtype, its name in glmc's CLI and
graphs, its safetensors code and its Triton pointer code."""

from __future__ import annotations

import torch

from glmc.errors import GlmcError

# torch dtype, glmc name, safetensors code, triton code
_TABLE = [
    (torch.float32, "fp32", "F32", "fp32"),
    (torch.float16, "fp16", "F16", "fp16"),
    (torch.bfloat16, "bf16", "BF16", "bf16"),
    (torch.int64, "int64", "I64", "i64"),
    (torch.int32, "int32", "I32", "i32"),
    (torch.int8, "int8", "I8", "i8"),
    (torch.uint8, "uint8", "U8", "u8"),
    (torch.bool, "bool", "BOOL", "i1"),
]
COMPUTE = ("fp32", "fp16", "bf16")          # --dtype choices
_BY_NAME = {name: t for t, name, _, _ in _TABLE}
_BY_SAFETENSORS = {st: t for t, _, st, _ in _TABLE}
_TRITON = {t: tr for t, _, _, tr in _TABLE}
_NAME = {t: name for t, name, _, _ in _TABLE}


def torch_dtype(name: str) -> torch.dtype:
    """'fp16' -> torch.float16 (also accepts torch's own short names, 'float16')."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    t = getattr(torch, name, None) if isinstance(name, str) else None
    if isinstance(t, torch.dtype) and t in _NAME:
        return t
    raise GlmcError(f"unsupported dtype {name!r}")


def name(dtype: torch.dtype) -> str:
    return _NAME[dtype]


def torch_short_name(dtype: torch.dtype) -> str:
    """torch's name without the prefix ('float16'), as serialised graphs spell dtypes."""
    return str(dtype).removeprefix("torch.")


def from_safetensors(code: str) -> torch.dtype:
    return _BY_SAFETENSORS[code]


def triton_pointer(dtype: torch.dtype) -> str:
    return "*" + _TRITON[dtype]
