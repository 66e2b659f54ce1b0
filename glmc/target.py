"""The compile target, parsed once: `cpu`, `cuda[:sm_80,sm_90]`, `rocm[:gfx906,gfx90a,gfx942]`.

Everything downstream (compiler, backends, tuner, CLI) takes a `Target`; nothing
else splits target strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmc.errors import GlmcError

# arch name -> (triton backend, arch id, warp size); gfx906 = Hygon DCU Z100 / MI50 class
# (wave64, no matrix cores)
ARCHS = {
    "sm_80": ("cuda", 80, 32), "sm_86": ("cuda", 86, 32), "sm_89": ("cuda", 89, 32), "sm_90": ("cuda", 90, 32),
    "gfx906": ("hip", "gfx906", 64), "gfx90a": ("hip", "gfx90a", 64), "gfx942": ("hip", "gfx942", 64),
}
DEFAULT_ARCHS = {"cuda": ("sm_80", "sm_90"), "rocm": ("gfx906", "gfx90a", "gfx942")}
KINDS = ("cpu", "cuda", "rocm")
USAGE = "cpu, cuda[:sm_80,sm_90], rocm[:gfx906,gfx90a,gfx942]"


@dataclass(frozen=True)
class Target:
    kind: str                   # cpu | cuda | rocm
    archs: tuple[str, ...] = ()  # GPU archs the artifact carries binaries for

    @property
    def family(self) -> str:
        """The backend implementation: cpu (onnxruntime) or gpu (Triton, both vendors)."""
        return "cpu" if self.kind == "cpu" else "gpu"

    @property
    def vendor(self) -> str | None:
        return None if self.kind == "cpu" else self.kind

    @property
    def is_gpu(self) -> bool:
        return self.kind != "cpu"

    def __str__(self) -> str:
        """The canonical spelling: `cpu`, `cuda:sm_80,sm_90` (Target.parse(str(t)) == t)."""
        return self.kind if not self.archs else f"{self.kind}:{','.join(self.archs)}"

    @staticmethod
    def parse(text: "str | Target") -> "Target":
        if isinstance(text, Target):
            return text
        if not isinstance(text, str):
            raise GlmcError(f"target must be a string like {USAGE}, got {text!r}")
        kind, sep, rest = text.strip().partition(":")
        if kind not in KINDS:
            raise GlmcError(f"unknown target {text!r} (supported: {USAGE})")
        if kind == "cpu":
            if sep:
                raise GlmcError(f"target {text!r}: the cpu target takes no arch list")
            return Target("cpu")
        names = tuple(a.strip() for a in rest.split(",") if a.strip()) if rest else DEFAULT_ARCHS[kind]
        backend = "cuda" if kind == "cuda" else "hip"
        for a in names:
            if a not in ARCHS or ARCHS[a][0] != backend:
                known = ", ".join(k for k, v in ARCHS.items() if v[0] == backend)
                raise GlmcError(f"target {text!r}: unknown {kind} arch {a!r} (known: {known})")
        if len(set(names)) != len(names):
            raise GlmcError(f"target {text!r} names an arch twice")
        return Target(kind, names)
