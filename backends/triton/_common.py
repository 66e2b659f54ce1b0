"""What every kernel launcher shares: configs, launching, and recording launches
for ahead-of-time compilation."""

from __future__ import annotations

import contextlib
import os
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


_TORCH_SIG = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8",
              torch.int64: "*i64", torch.int32: "*i32"}


def _sig(a) -> str:
    if isinstance(a, torch.Tensor):
        return _TORCH_SIG[a.dtype]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i32" if -2**31 <= a < 2**31 else "i64"
    if isinstance(a, float):
        return "fp32"
    raise TypeError(f"no triton signature for {type(a).__name__}")


class Launcher:
    """Runs launches: JIT by default; records them instead inside `recording()`;
    uses a prebuilt (AOT) kernel when one is registered for the launch's key."""

    def __init__(self):
        self.recorded: list[Launch] | None = None
        self.prebuilt: dict = {}          # aot key -> callable(grid, args)

    @contextlib.contextmanager
    def recording(self):
        self.recorded = []
        try:
            yield self.recorded
        finally:
            self.recorded = None

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


LAUNCHER = Launcher()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)
