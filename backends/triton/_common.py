"""What every kernel launcher shares: configs, launching, and recording launches
for ahead-of-time compilation."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import triton


@dataclass(frozen=True)
class Config:
    """One point of a kernel's config space: tunable constexprs plus launch options."""

    meta: tuple = ()            # sorted (name, value) pairs of tunable constexprs
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def of(num_warps: int = 4, num_stages: int = 2, **meta) -> "Config":
        return Config(tuple(sorted(meta.items())), num_warps, num_stages)

    def __getitem__(self, name):
        return dict(self.meta)[name]

    def as_dict(self) -> dict:
        return {"meta": dict(self.meta), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @staticmethod
    def from_dict(d: dict) -> "Config":
        return Config.of(d["num_warps"], d["num_stages"], **d["meta"])


@dataclass
class Launch:
    """A kernel launch, fully specified: what AOT compilation needs and what the runtime runs."""

    kernel: object              # the @triton.jit function
    grid: tuple
    args: list                  # runtime arguments in signature order (tensors / ints / floats)
    constexprs: dict
    config: Config
    names: list = field(default_factory=list)   # names of args

    def signature(self) -> dict:
        return {n: _sig(a) for n, a in zip(self.names, self.args)}


def _sig(a) -> str:
    if isinstance(a, torch.Tensor):
        from glmc.dtypes import triton_pointer

        return triton_pointer(a.dtype)
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i32" if -2**31 <= a < 2**31 else "i64"
    if isinstance(a, float):
        return "fp32"
    raise TypeError(f"no triton signature for {type(a).__name__}")


class Launcher:
    """Runs launches: JIT by default; records them instead when `record`; uses a prebuilt
    (AOT) kernel when one is registered for the launch's key. Each GPU executor owns one;
    kernel launchers reach the active one through `launch()`."""

    def __init__(self, prebuilt: dict | None = None, record: bool = False):
        self.prebuilt = dict(prebuilt or {})     # aot key -> callable(launch)
        self.recorded: list[Launch] | None = [] if record else None

    @contextlib.contextmanager
    def active(self):
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def __call__(self, launch: Launch) -> None:
        if self.recorded is not None:
            self.recorded.append(launch)
            return
        if self.prebuilt:
            from glmc.backends.triton.aot import launch_key

            run = self.prebuilt.get(launch_key(launch))
            if run is not None:
                run(launch)
                return
        c = launch.config
        launch.kernel[launch.grid](*launch.args, **launch.constexprs, num_warps=c.num_warps, num_stages=c.num_stages)


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("glmc_triton_launcher", default=None)
_JIT = Launcher()


def launch(spec: Launch) -> None:
    """Run (or record) a kernel launch with the active launcher (plain JIT outside any)."""
    (_ACTIVE.get() or _JIT)(spec)


def interpreting() -> bool:
    from glmc.settings import triton_interpret

    return triton_interpret()


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)
