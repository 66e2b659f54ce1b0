"""Ahead-of-time compilation for every listed arch, on a machine with no GPU."""

from __future__ import annotations

import json

import pytest
import torch
import triton

from glmc.backends.triton import aot, attention, matmul, rms_norm, rotary, swiglu
from glmc.backends.triton._common import Launcher
from glmc.quant import quantize

ARCHS = ["sm_80", "sm_90", "gfx906", "gfx90a", "gfx942"]


def _one_launch_per_kernel():
    """Every kernel, recorded (not run) at fp16 decode/prefill shapes on the meta device."""
    meta = dict(device="meta", dtype=torch.float16)
    p = quantize(torch.randn(64, 128), 4, 32)
    qw, sc = p.qweight.to("meta"), p.scales.to("meta")
    rec = Launcher(record=True)
    with rec.active():
        rms_norm.rms_norm(torch.empty(3, 96, **meta), torch.empty(96, **meta), 1e-5,
                          residual=torch.empty(3, 96, **meta))
        rotary.rotary(torch.empty(1, 4, 3, 24, **meta), torch.empty(1, 3, dtype=torch.int64, device="meta"),
                      torch.empty(64, 6, device="meta"), torch.empty(64, 6, device="meta"))
        swiglu.swiglu(torch.empty(3, 192, **meta))
        q, k = torch.empty(1, 4, 1, 24, **meta), torch.empty(1, 2, 1, 24, **meta)
        past = torch.empty(1, 2, 2047, 24, **meta)
        attention.attention(q, k, k, torch.empty(1, 1, 1, 2048, **meta), 0.2, past, past)     # split + combine
        matmul.linear(torch.empty(1, 128, **meta), qw, None, sc, None, 128, 4, 32)            # GEMV
        matmul.linear(torch.empty(64, 128, **meta), qw, None, sc, None, 128, 4, 32)           # GEMM
    return list(rec.recorded)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    launches = _one_launch_per_kernel()
    return out, launches, aot.compile_launches(launches, ARCHS, out)


def test_every_kernel_compiles_for_every_arch(compiled):
    out, launches, entries = compiled
    kernels = {launch.kernel.__name__ for launch in launches}
    assert kernels == {"_rms_norm_kernel", "_rotary_kernel", "_swiglu_kernel", "_attention_kernel",
                       "_attention_combine_kernel", "_gemv_kernel", "_matmul_kernel"}
    for arch in ARCHS:
        got = {e["kernel"] for e in entries if e["arch"] == arch}
        assert got == kernels, arch
    for e in entries:
        binary = (out / e["binary"]).read_bytes()
        assert binary[:4] == b"\x7fELF", e["binary"]         # cubin and hsaco are both ELF objects
        assert e["binary"].endswith(".cubin" if e["arch"].startswith("sm_") else ".hsaco")
        meta = json.loads((out / e["metadata"]).read_text())
        backend, arch_id, warp = aot.ARCHS[e["arch"]]
        assert meta["target"] == {"backend": backend, "arch": arch_id, "warp_size": warp}
        assert meta["triton_version"] == triton.__version__
        assert meta["name"] == e["kernel"]


def test_amd_binaries_name_their_gfx_arch(compiled):
    out, _, entries = compiled
    for e in entries:
        if e["arch"].startswith("gfx"):
            assert e["arch"].encode() in (out / e["binary"]).read_bytes()


def test_prebuilt_index_loads_only_matching_version_and_arch(compiled):
    out, _, entries = compiled
    index = {"triton_version": triton.__version__, "archs": ARCHS, "entries": entries}
    runners = aot.load_prebuilt(out, index, "sm_90")
    assert set(runners) == {e["key"] for e in entries if e["arch"] == "sm_90"}
    assert aot.load_prebuilt(out, dict(index, triton_version="0.0.1"), "sm_90") == {}
    assert aot.load_prebuilt(out, index, "sm_75") == {}


def test_launch_key_separates_configs_and_dtypes():
    launches = _one_launch_per_kernel()
    keys = {aot.launch_key(launch) for launch in launches}
    assert len(keys) == len(launches)
