"""glmc/hugepages.py: what a block maps is moved onto 2 MB pages, what it left mostly empty is
not, and GLMC_HUGE_PAGES=0 turns it off. Read back from /proc/self/smaps (Linux)."""

from __future__ import annotations

import ctypes
import mmap

import pytest

from glmc import hugepages

MB = 1 << 20


def _usage(addr: int) -> dict:
    """Rss and AnonHugePages (bytes) of the mapping that holds addr."""
    out, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= addr < hi
            elif inside and head[0] in ("Rss:", "AnonHugePages:"):
                out[head[0][:-1]] = int(head[1]) * 1024
    return out


_KEEP = []


def _private(size: int) -> int:
    """The address of `size` bytes of an anonymous private mapping of its own (between two
    PROT_NONE pages, so the kernel cannot merge it with a neighbour), huge pages not asked
    for: 4 KB pages where transparent huge pages are in "madvise" mode."""
    buf = mmap.mmap(-1, size + 2 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _KEEP.append(buf)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for guard in (base, base + mmap.PAGESIZE + size):
        assert libc.mprotect(guard, mmap.PAGESIZE, 0) == 0
    return base + mmap.PAGESIZE


@pytest.fixture
def collapsing():
    why = hugepages.available()
    if why is not None:
        pytest.skip(f"huge pages cannot be used here: {why}")
    probe = _private(4 * MB)
    ctypes.memset(probe, 1, 4 * MB)
    if not hugepages.collapse([(probe, probe + 4 * MB)]):
        pytest.skip("this kernel refuses MADV_COLLAPSE (Linux < 6.1, or no memory for a 2 MB page)")


def test_a_mapping_the_block_fills_is_moved_onto_huge_pages(collapsing):
    with hugepages.collapsed():
        buf = _private(16 * MB)
        ctypes.memset(buf, 7, 16 * MB)
    hugepages.settle()
    usage = _usage(buf)
    assert usage["AnonHugePages"] >= 14 * MB, usage             # all its whole 2 MB pages
    assert ctypes.string_at(buf, 16 * MB) == b"\7" * (16 * MB)  # contents kept


def test_a_mostly_empty_mapping_and_one_made_before_are_left_alone(collapsing):
    before = _private(16 * MB)
    ctypes.memset(before, 1, 16 * MB)
    huge_before = _usage(before).get("AnonHugePages", 0)
    with hugepages.collapsed():
        sparse = _private(16 * MB)
        ctypes.memset(sparse, 2, 4096)                          # one page of 4096
    hugepages.settle()
    assert _usage(sparse)["Rss"] <= 64 * 1024 and _usage(sparse).get("AnonHugePages", 0) == 0
    assert _usage(before).get("AnonHugePages", 0) == huge_before


def test_GLMC_HUGE_PAGES_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("GLMC_HUGE_PAGES", "0")
    assert hugepages.available() == "GLMC_HUGE_PAGES=0"
    with hugepages.collapsed():
        buf = _private(8 * MB)
        ctypes.memset(buf, 1, 8 * MB)
    hugepages.settle()
    assert _usage(buf).get("AnonHugePages", 0) == 0


def test_onnxruntime_sessions_are_built_inside_it(artifacts, monkeypatch):
    """The cpu executor builds a step session (and so its pre-packed weights) inside
    `collapsed()`; not the pieces of a split step, whose linears' weights are glmc's kernels',
    copied by `placed()` (reading /proc for each of a 9B model's 160 pieces would slow its load)."""
    import contextlib

    import glmc
    import glmc.backends.cpu.runtime as runtime

    inside, built = [], []

    @contextlib.contextmanager
    def spy():
        inside.append(True)
        yield
        inside.pop()

    real = runtime.ort.InferenceSession

    def session(*a, **k):
        built.append(bool(inside))
        return real(*a, **k)

    monkeypatch.setattr(runtime, "collapsed", spy)
    monkeypatch.setattr(runtime.ort, "InferenceSession", session)
    for options, want in (({"fp32_matmul": "onnxruntime"}, True), ({"fp32_matmul": "glmc"}, False)):
        built.clear()
        glmc.load(artifacts("tiny-glm", **options)).executor.sessions["step"]
        assert built and set(built) == {want}, (options, built)


def test_placed_copies_are_equal_aligned_writable_and_on_huge_pages(collapsing):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((300, 257)).astype(np.float32), rng.integers(0, 255, (5001,), np.uint8),
              rng.standard_normal((2048, 1024)).astype(np.float32)]          # 0.3 MB, 5001 B, 8 MB
    copies = hugepages.placed(arrays)
    hugepages.settle()
    for a, c in zip(arrays, copies):
        assert c.dtype == a.dtype and c.shape == a.shape and np.array_equal(c, a)
        assert c.ctypes.data % 64 == 0 and c.flags.writeable and not np.shares_memory(a, c)
    start = copies[0].ctypes.data
    assert start % (2 * MB) == 0
    end = copies[-1].ctypes.data + copies[-1].nbytes
    assert _usage(start)["AnonHugePages"] >= (end - start) // (2 * MB) * 2 * MB     # every whole 2 MB page


def test_placed_copies_nothing_with_GLMC_HUGE_PAGES_0(monkeypatch):
    import numpy as np

    monkeypatch.setenv("GLMC_HUGE_PAGES", "0")
    assert hugepages.placed([np.ones(1000, np.float32)]) is None


def _kernel_weights(rt) -> list:
    """(the array each of the step's kernel linears reads, the mapped array it was loaded from)."""
    import torch

    from glmc.backends.cpu.runtime16 import _Linear

    ex = rt.executor
    step = ex.sessions[ex.generation]
    inits = ex._backend["initializers"][ex.generation]
    return [(torch.utils.dlpack.from_dlpack(s.w).numpy(), ex._weights[inits[s.weights[0]]])
            for s in step.steps if isinstance(s, _Linear)]


def _greedy(rt, ids, n: int = 4):
    import numpy as np

    cache, last = rt.prefill([ids])
    logits, tok, pos = [last[0].copy()], int(last[0].argmax()), np.array([len(ids)])
    for _ in range(n):
        out = rt.executor.decode(cache, np.array([[tok]]), pos)[0, 0]
        logits.append(out.copy())
        tok, pos = int(out.argmax()), pos + 1
    return np.stack(logits)


def test_glmc_kernels_read_copies_that_decode_exactly_as_the_mapping(artifacts, monkeypatch, collapsing):
    """An fp32 artifact on glmc's kernels: each linear's kernel reads a copy of its weight on 2 MB
    pages, not the artifact's mapping; the logits equal, bit for bit, those of the same artifact
    read from the mapping (GLMC_HUGE_PAGES=0) or where memory is too short for the copies."""
    import numpy as np

    import glmc

    path = artifacts("tiny-glm", fp32_matmul="glmc")
    ids = [5, 17, 300, 42, 9, 1000, 3]
    rt = glmc.load(path)
    want = _greedy(rt, ids)
    read = _kernel_weights(rt)
    assert read and len(rt.executor._placed) == len(read)
    for kernel, mapped in read:
        assert np.array_equal(kernel, mapped) and not np.shares_memory(kernel, rt.executor._map)
    hugepages.settle()
    first = min(kernel.ctypes.data for kernel, _ in read)
    assert first % (2 * MB) == 0 and _usage(first)["AnonHugePages"] > 0
    for env, value in (("GLMC_HUGE_PAGES", "0"), ("GLMC_MEMORY_LIMIT_GB", "0.0001")):
        with monkeypatch.context() as m:
            m.setenv(env, value)
            other = glmc.load(path)
            got = _greedy(other, ids)
            assert not other.executor._placed, env
            assert all(np.shares_memory(kernel, other.executor._map) for kernel, _ in _kernel_weights(other)), env
        np.testing.assert_array_equal(got, want)


def test_release_pages_of_a_part_drops_only_its_pages_and_they_read_back(tmp_path):
    """What the executor calls after copying each weight: that weight's mapped pages leave the
    resident set (the copies' peak is not the weights twice), the rest stay, and the dropped
    ones read back from the file unchanged."""
    import numpy as np
    from safetensors.numpy import save_file

    from glmc.weights import mapped_arrays, release_pages

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((1024, 1024)).astype(np.float32),
               "b": rng.standard_normal((1024, 1024)).astype(np.float32)}        # 4 MB each
    save_file(tensors, str(tmp_path / "w.safetensors"))
    mm, arrays = mapped_arrays(tmp_path / "w.safetensors", private=True)
    assert all(float(arrays[k].sum()) == float(tensors[k].sum()) for k in tensors)   # every page read
    before = _usage(mm.ctypes.data)["Rss"]
    release_pages(mm, arrays["a"])
    after = _usage(mm.ctypes.data)["Rss"]
    assert 4 * MB - 8192 <= before - after <= 4 * MB + 8192, (before, after)
    assert np.array_equal(arrays["a"], tensors["a"]) and np.array_equal(arrays["b"], tensors["b"])
