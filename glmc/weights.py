"""Weights as recipes: what each graph constant is made of, computed when it is written.

A compile traces a model whose parameters are uninitialised (never-touched) memory and
records, per constant, a recipe over the checkpoint's tensors: `Source` (a tensor of the
checkpoint, or a row range of one), `Cat` (qkv / gate-up packing), `Transpose`, `Blocks`,
`Cast`,
and multi-output `Quantized` / `EmbeddingInt8` (a `Part` picks one output). Passes ask
the context's `WeightBook` for derived weights; in a lazy book they get a placeholder
tensor of the right shape and dtype, in an eager book (tests, --calibrate) the value.
`write_safetensors` lays out every recipe's bytes first and then computes and writes
them one producer at a time, in row chunks: peak memory is one chunk, not the model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from glmc.errors import GlmcError

CHUNK_ELEMENTS = 1 << 24          # rows per written chunk: about 64 MB of fp32 input


class Lazy:
    """A weight to be computed: shape, dtype, a hashable key, and rows(r0, r1)."""

    shape: tuple
    dtype: torch.dtype

    @property
    def key(self) -> tuple:
        raise NotImplementedError

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        return self.rows(0, self.shape[0] if self.shape else 1)

    @property
    def chunkable(self) -> bool:
        return True

    def row_source(self) -> "tuple[Lazy, int] | None":
        """(x, f) where row r of this recipe is made from rows r*f .. r*f+f-1 of recipe x alone
        (a layout of x's rows): the weights writer then computes x's chunk once for every
        layout of it. None for other recipes."""
        return None

    def release(self) -> None:
        """Forget anything kept between calls of rows(); called once the recipe is written."""


@dataclass(eq=False)
class Source(Lazy):
    """Checkpoint tensor `name` (rows as the checkpoint's TensorSource reads them), as fp32."""

    name: str
    shape: tuple
    read: object = field(repr=False)         # (name, r0, r1) -> tensor
    dtype: torch.dtype = torch.float32

    @property
    def key(self):
        return ("src", self.name, self.shape)

    def rows(self, r0, r1):
        t = self.read(self.name, r0, r1).to(torch.float32)
        if not torch.isfinite(t).all():
            raise GlmcError(f"tensor '{self.name}' contains NaN or Inf")
        return t


@dataclass(eq=False)
class Const(Lazy):
    """A tensor already in memory (small constants, preset weights, eager results)."""

    value: torch.Tensor

    def __post_init__(self):
        self.shape, self.dtype = tuple(self.value.shape), self.value.dtype

    @property
    def key(self):
        return ("const", id(self.value))

    def rows(self, r0, r1):
        return self.value[r0:r1] if self.value.dim() else self.value


@dataclass(eq=False)
class Zeros(Lazy):
    shape: tuple
    dtype: torch.dtype = torch.float32

    @property
    def key(self):
        return ("zeros", self.shape, self.dtype)

    def rows(self, r0, r1):
        return torch.zeros((r1 - r0, *self.shape[1:]), dtype=self.dtype)


@dataclass(eq=False)
class Cat(Lazy):
    """torch.cat(parts, 0)."""

    parts: tuple

    def __post_init__(self):
        self.shape = (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    @property
    def key(self):
        return ("cat", tuple(p.key for p in self.parts))

    def rows(self, r0, r1):
        out, base = [], 0
        for p in self.parts:
            n = p.shape[0]
            lo, hi = max(r0, base), min(r1, base + n)
            if lo < hi:
                out.append(p.rows(lo - base, hi - base))
            base += n
        return torch.cat(out, 0)


@dataclass(eq=False)
class Transpose(Lazy):
    x: Lazy

    def __post_init__(self):
        self.shape, self.dtype = tuple(reversed(self.x.shape)), self.x.dtype

    @property
    def key(self):
        return ("t", self.x.key)

    @property
    def chunkable(self):
        return False

    def rows(self, r0, r1):
        return self.x.full().T[r0:r1].contiguous()


@dataclass(eq=False)
class Rows(Lazy):
    """Rows lo .. hi-1 of x (the gate or the up half of a packed [gate | up] weight)."""

    x: Lazy
    lo: int
    hi: int

    def __post_init__(self):
        self.shape, self.dtype = (self.hi - self.lo, *self.x.shape[1:]), self.x.dtype

    @property
    def key(self):
        return ("rows", self.x.key, self.lo, self.hi)

    @property
    def chunkable(self):
        return self.x.chunkable

    def rows(self, r0, r1):
        return self.x.rows(self.lo + r0, self.lo + min(r1, self.shape[0]))


@dataclass(eq=False)
class RowLayout(Lazy):
    """A layout of x's rows: row r is made from rows r*width .. r*width+width-1 of x alone
    (`lay`), so it is written a run of such row groups at a time, from the same chunk of x as
    any other layout of x (`row_source`)."""

    x: Lazy
    width: int

    @property
    def chunkable(self):
        return self.x.chunkable

    def row_source(self):
        return self.x, self.width

    def lay(self, rows: torch.Tensor) -> torch.Tensor:
        """x's rows r0*width .. r1*width-1 -> this recipe's rows r0 .. r1-1."""
        raise NotImplementedError

    def rows(self, r0, r1):
        return self.lay(self.x.rows(r0 * self.width, r1 * self.width))


@dataclass(eq=False)
class Blocks(RowLayout):
    """x (N, K) as (N / width, K, width): block i holds rows i*width .. i*width+width-1 of x as
    columns (backends/cpu/linear16.py's weight layout)."""

    def __post_init__(self):
        N, K = self.x.shape
        self.shape, self.dtype = (N // self.width, K, self.width), self.x.dtype

    @property
    def key(self):
        return ("blocks", self.x.key, self.width)

    def lay(self, rows):
        return rows.reshape(-1, self.width, rows.shape[-1]).transpose(1, 2).contiguous()


@dataclass(eq=False)
class Cast(Lazy):
    """x in `dtype`; fp16 refuses values beyond its range, naming the weight."""

    x: Lazy
    dtype: torch.dtype
    label: str = ""

    def __post_init__(self):
        self.shape = self.x.shape

    @property
    def key(self):
        return ("cast", self.x.key, self.dtype)

    @property
    def chunkable(self):
        return self.x.chunkable

    def rows(self, r0, r1):
        t = self.x.rows(r0, r1)
        if self.dtype == torch.float16 and t.numel() and t.abs().max().item() > 65504.0:
            raise GlmcError(f"weight {self.label} holds values beyond the fp16 range (|w| max "
                            f"{t.abs().max().item():.3g} > 65504); compile with --dtype bf16 or fp32")
        return t.to(self.dtype)


class Multi(Lazy):
    """A row-wise computation with several outputs (each a `Part`)."""

    outputs: tuple        # ((shape, dtype), ...)

    def compute(self, r0: int, r1: int) -> tuple:
        raise NotImplementedError

    def part(self, i: int) -> "Part":
        return Part(self, i)


@dataclass(eq=False)
class Part(Lazy):
    multi: Multi
    index: int

    def __post_init__(self):
        self.shape, self.dtype = self.multi.outputs[self.index]

    @property
    def key(self):
        return ("part", self.multi.key, self.index)

    def rows(self, r0, r1):
        return self.multi.compute(r0, r1)[self.index]


class WeightBook:
    """Which graph constants are recipes. An eager book's `value` computes at once (tests,
    calibration); a lazy one's gives a placeholder and keeps the recipe."""

    def __init__(self, eager: bool = True):
        self.eager = eager
        self._by_ident: dict[tuple, Lazy] = {}
        self._keep: list[torch.Tensor] = []
        self._placeholders: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _ident(t: torch.Tensor):
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)

    def register(self, tensor: torch.Tensor, lazy: Lazy) -> None:
        if tensor.numel():
            self._by_ident[self._ident(tensor)] = lazy
            self._keep.append(tensor)

    def recipe(self, t: torch.Tensor) -> Lazy:
        """The recipe behind graph constant t (a Const for a tensor in memory)."""
        if t.numel():
            found = self._by_ident.get(self._ident(t))
            if found is not None:
                return found
        return Const(t)

    def is_lazy(self, t: torch.Tensor) -> bool:
        return bool(t.numel()) and self._ident(t) in self._by_ident

    def value(self, lazy: Lazy) -> torch.Tensor:
        """A graph constant for `lazy`: its value (eager book or all-Const inputs), else a placeholder."""
        if self.eager or _all_const(lazy):
            return lazy.full() if lazy.shape else lazy.rows(0, 1)
        ph = self._placeholders.get(lazy.key)
        if ph is None:
            # never written: the pages stay unallocated; only the recipe is ever materialised
            ph = self._placeholders[lazy.key] = torch.empty(lazy.shape, dtype=lazy.dtype)
            self.register(ph, lazy)
        return ph

    def cat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self.value(Cat(tuple(self.recipe(t) for t in tensors)))



def _inputs(lazy: Lazy) -> tuple:
    """The recipes `lazy` is computed from."""
    if isinstance(lazy, Cat):
        return lazy.parts
    if isinstance(lazy, Part):
        return (lazy.multi,)
    inner = getattr(lazy, "x", None)        # Transpose, Cast, a Multi's input
    return () if inner is None else (inner,)


def _all_const(lazy: Lazy) -> bool:
    if isinstance(lazy, (Const, Zeros)):
        return True
    if isinstance(lazy, Source):
        return False
    inputs = _inputs(lazy)
    return bool(inputs) and all(_all_const(x) for x in inputs)


def source_names(lazy: Lazy) -> set[str]:
    """The checkpoint tensors a recipe reads."""
    if isinstance(lazy, Source):
        return {lazy.name}
    return set().union(*(source_names(x) for x in _inputs(lazy)))


# ---------------------------------------------------------------------------- writing

# safetensors dtype names, both ways
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
             "BOOL": torch.bool}
_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return memoryview(t.view(torch.int16).numpy()).cast("B")
    return memoryview(t.numpy()).cast("B")


def _producer(lazy: Lazy) -> tuple[Lazy, int]:
    """(the recipe whose row chunks make `lazy`, how many of its rows make one row of lazy):
    a Multi under its Part, through layouts of rows (`row_source`)."""
    if isinstance(lazy, Part):
        return lazy.multi, 1
    source = lazy.row_source()
    if source is not None:
        inner, f = _producer(source[0])
        if isinstance(inner, Multi):
            return inner, f * source[1]
    return lazy, 1


def _release(lazy: Lazy) -> None:
    """release() a written recipe and what it reads: a Multi under a layout recipe (a glmc
    kernel's codes or blocked scales) is not a producer itself, and kept its last chunk
    (a 9B int4 compile held 15 GB of them)."""
    lazy.release()
    for x in _inputs(lazy):
        _release(x)


def write_safetensors(entries: dict[str, Lazy], path: Path) -> dict[str, tuple[int, int]]:
    """Write entries (name -> recipe) as one safetensors file, computing one producer's row
    chunk at a time. Returns name -> (absolute byte offset, length) in the file."""
    header, offset = {}, 0
    for name, lazy in entries.items():
        n = _nbytes(lazy.shape, lazy.dtype)
        header[name] = {"dtype": _ST_NAMES[lazy.dtype], "shape": list(lazy.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 64)            # tensors start 64-byte aligned
    base = 8 + len(blob)
    # every output of one producer, so a multi-output recipe is computed once per chunk (its
    # Parts, and layouts of its rows: a glmc kernel's codes and blocked scales)
    by_producer: dict[int, tuple[Lazy, list]] = {}
    for name, lazy in entries.items():
        prod, f = _producer(lazy)
        by_producer.setdefault(id(prod), (prod, []))[1].append((name, lazy, f))
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.truncate(base + offset)
        fd = f.fileno()
        for prod, outs in by_producer.values():
            rows = prod.shape[0] if prod.shape else 1
            width = max(1, math.prod(prod.shape[1:])) if prod.shape else 1
            unit = math.lcm(*(f for *_, f in outs))          # a chunk holds whole rows of every layout
            step = rows if not prod.chunkable else max(unit, CHUNK_ELEMENTS // width // unit * unit)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                values = prod.compute(r0, r1) if isinstance(prod, Multi) else None
                for name, lazy, f in outs:
                    if f > 1:
                        t = lazy.rows(r0 // f, r1 // f)         # a layout of the chunk just computed
                    else:
                        t = values[lazy.index] if values is not None else (
                            lazy.rows(r0, r1) if lazy.shape else lazy.rows(0, 1).reshape(()))
                    if tuple(t.shape[1:]) != tuple(lazy.shape[1:]) or t.dtype != lazy.dtype:
                        raise RuntimeError(f"recipe for {name} produced {tuple(t.shape)} {t.dtype}, "
                                           f"expected {lazy.shape} {lazy.dtype}")
                    row_bytes = _nbytes(lazy.shape[1:], lazy.dtype) if lazy.shape else 0
                    os.pwrite(fd, _as_bytes(t), base + header[name]["data_offsets"][0] + r0 // f * row_bytes)
            _release(prod)      # a row-wise Multi keeps its last chunk's outputs (~50 MiB per layer at 9B)
    return {name: (base + h["data_offsets"][0], h["data_offsets"][1] - h["data_offsets"][0])
            for name, h in header.items()}


def release_pages(mm: np.memmap, part: np.ndarray | None = None) -> None:
    """Drop the resident pages of a map from `mapped_arrays` (they stay in the page cache; the
    next read faults them back in), or only those under `part`, a view of it. After
    onnxruntime has pre-packed a weight, or glmc has copied one for its kernels, the original
    is not read again, so its mapped pages would only inflate the resident set. Nothing is
    ever written to the map, so a dropped page reads back as it was."""
    import mmap

    if part is None:
        mm._mmap.madvise(mmap.MADV_DONTNEED)
        return
    lo = part.ctypes.data - mm.ctypes.data
    start = lo // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(len(mm), lo + part.nbytes)
    if end > start:
        mm._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)


def mapped_arrays(path: Path, private: bool = False) -> tuple[np.memmap, dict[str, np.ndarray]]:
    """The file's memory map and every tensor in it as a read-only numpy view of that map
    (bf16 as uint16); `private`: a copy-on-write map, writable views (what DLPack exports:
    TVM takes no read-only array), where nothing is ever written."""
    from glmc.safetensors_check import data_start, read_header

    header = read_header(path)
    base = data_start(path)
    mm = np.memmap(path, dtype=np.uint8, mode="c" if private else "r")
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        b, e = h["data_offsets"]
        dtype = ST_DTYPES[h["dtype"]]
        np_dtype = np.uint16 if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype
        out[name] = mm[base + b: base + e].view(np_dtype).reshape(h["shape"])
    return mm, out
