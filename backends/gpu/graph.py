"""The rewritten FX graph as plain JSON, and an interpreter that runs it on a GPU.

An artifact holds no pickle and no Python: each node is an op name (resolved at
load only within torch.ops.aten / torch.ops.glmc, plus operator.getitem) with
JSON-encoded arguments; weights live in weights.safetensors.
"""

from __future__ import annotations

import math
import operator
import time

import torch

from glmc.errors import GlmcError

NAMESPACES = ("aten", "glmc")
# integer arithmetic on symbolic sizes that torch.export leaves as Python operator calls
OPERATORS = {f"operator.{n}": getattr(operator, n) for n in ("add", "sub", "mul", "floordiv", "mod", "neg", "getitem")}
_OPERATOR_NAMES = {fn: name for name, fn in OPERATORS.items()}


def _encode(a):
    if isinstance(a, torch.fx.Node):
        return {"node": a.name}
    if isinstance(a, (list, tuple)):
        return {"list": [_encode(x) for x in a], "tuple": isinstance(a, tuple)}
    if isinstance(a, bool) or a is None or isinstance(a, (int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, torch.dtype):
        from glmc.dtypes import torch_short_name

        return {"dtype": torch_short_name(a)}
    if isinstance(a, torch.device):
        return {"device": a.type}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    raise GlmcError(f"cannot serialise graph argument of type {type(a).__name__} ({a!r})")


def _target_name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    if target in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[target]
    if isinstance(target, torch._ops.OpOverload):
        return str(target)   # e.g. aten.linear.default
    raise GlmcError(f"cannot serialise call to {target!r}: only aten/glmc ops and getitem")


def to_json(gm: torch.fx.GraphModule) -> dict:
    nodes = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == "_guards_fn":   # torch.export's input guard: shapes are checked by the runtime
            continue
        if n.op == "placeholder":
            nodes.append({"op": "input", "name": n.name})
        elif n.op == "get_attr":
            nodes.append({"op": "weight", "name": n.name, "target": n.target})
        elif n.op == "call_function":
            nodes.append({"op": "call", "name": n.name, "target": _target_name(n.target),
                          "args": _encode(n.args), "kwargs": {k: _encode(v) for k, v in n.kwargs.items()}})
        elif n.op == "output":
            nodes.append({"op": "output", "args": _encode(n.args[0])})
        else:
            raise GlmcError(f"cannot serialise graph node {n.name} ({n.op})")
    return {"nodes": nodes}


def resolve(name: str):
    if name == "getitem":
        return operator.getitem
    if name in OPERATORS:
        return OPERATORS[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in NAMESPACES:
        raise GlmcError(f"graph names op {name!r}: only aten.* / glmc.* ops are allowed in an artifact")
    if parts[0] == "glmc":
        from glmc.registry import ops

        if parts[1] not in ops():
            raise GlmcError(f"graph names unknown op {name!r} (glmc ops: {', '.join(sorted(ops()))})")
    try:
        return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        raise GlmcError(f"graph names unknown op {name!r}") from None


def decode_arg(a, env, device, compute_dtype):
    if isinstance(a, dict):
        if "node" in a:
            return env[a["node"]]
        if "list" in a:
            items = [decode_arg(x, env, device, compute_dtype) for x in a["list"]]
            return tuple(items) if a.get("tuple") else items
        if "float" in a:
            return float(a["float"])
        if "dtype" in a:
            from glmc.dtypes import torch_dtype

            return torch_dtype(a["dtype"])
        if "device" in a:
            return device
        if "layout" in a:
            return getattr(torch, a["layout"])
        if "memory_format" in a:
            return getattr(torch, a["memory_format"])
        raise GlmcError(f"graph argument {a!r} is not understood")
    return a


class Program:
    """A loaded graph: ops resolved once, run node by node; glmc ops and linears go to `kernels`."""

    def __init__(self, graph: dict, weights: dict[str, torch.Tensor], kernels: dict, device, compute_dtype):
        self.device, self.compute_dtype = device, compute_dtype
        self.inputs = [n["name"] for n in graph["nodes"] if n["op"] == "input"]
        self.consts = {n["name"]: weights[n["target"]] for n in graph["nodes"] if n["op"] == "weight"}
        self.steps = []
        for n in graph["nodes"]:
            if n["op"] == "call":
                fn = kernels.get(n["target"]) or resolve(n["target"])
                self.steps.append((n["name"], fn, n["args"], n["kwargs"], n["target"]))
            elif n["op"] == "output":
                self.output = n["args"]

    def __call__(self, *inputs, profile: dict | None = None):
        """Run the graph; with `profile` (a dict), add each op's seconds to profile[op name]
        (the device is synchronised around every op, so only for profiling)."""
        env = dict(self.consts)
        env.update(zip(self.inputs, inputs))
        dev, dt = self.device, self.compute_dtype
        for name, fn, args, kwargs, target in self.steps:
            if profile is not None:
                _sync(dev)
                t0 = time.perf_counter()
            env[name] = fn(*decode_arg(args, env, dev, dt),
                           **{k: decode_arg(v, env, dev, dt) for k, v in kwargs.items()})
            if profile is not None:
                _sync(dev)
                profile[target] = profile.get(target, 0.0) + time.perf_counter() - t0
        return decode_arg(self.output, env, dev, dt)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
