"""Target: the one parser of target strings; everything else takes the parsed object."""

from __future__ import annotations

import pytest

from glmc.backends import get_backend
from glmc.errors import GlmcError
from glmc.target import Target


@pytest.mark.parametrize("text,kind,archs", [
    ("cpu", "cpu", ()), (" cpu ", "cpu", ()),
    ("cuda", "cuda", ("sm_80", "sm_90")), ("cuda:sm_90", "cuda", ("sm_90",)),
    ("rocm", "rocm", ("gfx906", "gfx90a", "gfx942")), ("rocm:gfx906,gfx942", "rocm", ("gfx906", "gfx942")),
])
def test_parse(text, kind, archs):
    t = Target.parse(text)
    assert (t.kind, t.archs) == (kind, archs)
    assert Target.parse(str(t)) == t                       # the canonical spelling round-trips
    assert t.family == ("cpu" if kind == "cpu" else "gpu") and t.vendor == (None if kind == "cpu" else kind)


@pytest.mark.parametrize("text,message", [
    ("cuda:gfx906", "unknown cuda arch 'gfx906'"), ("rocm:sm_80", "unknown rocm arch 'sm_80'"),
    ("cuda:sm_80,sm_80", "names an arch twice"), ("vulkan", "unknown target 'vulkan'"),
    ("cpu:avx512", "takes no arch list"), (3, "must be a string"),
])
def test_parse_errors(text, message):
    with pytest.raises(GlmcError, match=message):
        Target.parse(text)


def test_backends_by_family():
    cpu, cuda, rocm = get_backend("cpu"), get_backend("cuda:sm_90"), get_backend(Target.parse("rocm"))
    assert (cpu.default_dtype, cuda.default_dtype, rocm.default_dtype) == ("fp32", "fp16", "fp16")
    assert cpu.chunked_prefill_default is False and cuda.chunked_prefill_default is True
    assert cuda.target.archs == ("sm_90",) and rocm.target.vendor == "rocm"
    assert cpu.why_cannot_run_here() is None
