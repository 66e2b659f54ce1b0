"""PEFT LoRA adapters merged into the base weights at compile: W + scale * B @ A.

An adapter directory holds adapter_config.json (peft_type LORA, r, lora_alpha,
target_modules, use_rslora, alpha_pattern, bias, modules_to_save, use_dora ...) and
adapter_model.safetensors (adapter_model.bin only under --allow-pickle). Its tensors are
named after the base checkpoint's own modules (`base_model.model.<module>.lora_A.weight`),
so the delta is applied to the *stored* tensor, before glmc renames or splits anything:
an adapter trained on the original ChatGLM layout (query_key_value, dense, dense_h_to_4h,
dense_4h_to_h) lands on q/k/v, o_proj and the MLP exactly as the base weights do.

Merging wraps the checkpoint's row readers: reading rows r0:r1 of a target returns the
base rows plus scale * B[r0:r1] @ A, so the model is never resident at once.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmc.errors import GlmcError

_PREFIX = "base_model.model."
_KEY = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
# adapter_config.json keys that do not change the merged weights beyond W + scale * B @ A
# (initialisation, training and bookkeeping settings); any other key that is set is refused
HARMLESS_KEYS = {"peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "alpha_pattern", "rank_pattern",
                 "bias", "modules_to_save", "use_dora", "fan_in_fan_out", "base_model_name_or_path", "task_type",
                 "inference_mode", "init_lora_weights", "lora_dropout", "layers_pattern", "layers_to_transform",
                 "exclude_modules", "revision", "auto_mapping", "peft_version", "megatron_core", "loftq_config",
                 "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying", "qalora_group_size"}


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


@dataclass
class Adapter:
    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]       # as stored in the adapter file
    sha256: str
    scale: float = 1.0                     # the user's --lora-scale
    pairs: dict[str, tuple] = field(default_factory=dict)   # base module -> (A, B, scaling)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: stored name -> tensor

    def describe(self) -> dict:
        c = self.config
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "scale": self.scale, "r": c.get("r"),
                "lora_alpha": c.get("lora_alpha"), "use_rslora": bool(c.get("use_rslora")),
                "modules": len(self.pairs), "modules_to_save": sorted(self.replaced)}


def read_adapter(path, scale: float = 1.0, allow_pickle: bool = False) -> Adapter:
    path = Path(path)
    where = path / "adapter_config.json"
    if not path.is_dir():
        raise GlmcError(f"--lora {path}: no such adapter directory")
    if not where.is_file():
        hint = " (it is a model checkpoint: pass it as MODEL)" if (path / "config.json").is_file() else ""
        raise GlmcError(f"--lora {path}: no adapter_config.json{hint}")
    from glmc.checkpoint import _read_json

    cfg = _read_json(where, "adapter_config.json")
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise GlmcError(f"{where}: peft_type {kind} is not supported (glmc merges LoRA adapters)")
    if cfg.get("use_dora"):
        raise GlmcError(f"{where}: use_dora=true (DoRA) is not supported; glmc merges plain LoRA")
    if cfg.get("bias", "none") != "none":
        raise GlmcError(f"{where}: bias={cfg['bias']!r} (trained biases) is not supported; glmc merges bias='none'")
    for key, value in cfg.items():
        if key not in HARMLESS_KEYS and value not in (None, False, {}, [], ""):
            raise GlmcError(f"{where}: {key}={value!r} is not supported (glmc merges plain LoRA: W + scale * B @ A)")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise GlmcError(f"--lora-scale must be a finite number, got {scale!r}")
    st, pickled = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors, data = load_file(str(st)), st.read_bytes()
        except (SafetensorError, OSError) as e:
            raise GlmcError(f"{st}: not a readable safetensors file ({e})") from None
    elif pickled.is_file():
        if not allow_pickle:
            raise GlmcError(f"{path}: only adapter_model.bin (pickle); convert it to safetensors or pass --allow-pickle")
        from glmc.checkpoint import _read_pickle

        tensors = {}
        _read_pickle(pickled, tensors)
        data = pickled.read_bytes()
    else:
        raise GlmcError(f"{path}: no adapter_model.safetensors")
    adapter = Adapter(path, cfg, tensors, hashlib.sha256(data).hexdigest(), float(scale))
    _pair_up(adapter)
    return adapter


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module whose name ends with it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _pair_up(a: Adapter) -> None:
    cfg, halves = a.config, {}
    for name, t in a.tensors.items():
        if not name.startswith(_PREFIX):
            raise GlmcError(f"{a.path}: tensor {name!r} is not a PEFT adapter tensor (expected {_PREFIX}...)")
        inner = name[len(_PREFIX):]
        if m := _KEY.fullmatch(inner):
            halves.setdefault(m.group(1), {})[m.group(2)] = t
        elif ".lora_" in inner or ".lora_magnitude" in inner:
            raise GlmcError(f"{a.path}: tensor {name!r} is not supported (only lora_A / lora_B weights)")
        else:   # modules_to_save, or (save_embedding_layers) a LoRA target's base weight: a full replacement
            for marker in (".modules_to_save.default.", ".modules_to_save.", ".base_layer."):
                inner = inner.replace(marker, ".")
            a.replaced[inner] = t
    for module, h in halves.items():
        if set(h) != {"A", "B"}:
            raise GlmcError(f"{a.path}: module {module} has lora_{''.join(h)} without its pair")
        A, B = h["A"], h["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise GlmcError(f"{a.path}: module {module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                            "do not form a low-rank pair")
        r = A.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        a.pairs[module] = (A, B, scaling * a.scale)
    if not a.pairs and not a.replaced:
        raise GlmcError(f"{a.path}: the adapter holds no LoRA weights")


def check_targets(adapters: list[Adapter], stored: dict[str, tuple]) -> None:
    """Every adapter module must be a 2-D tensor of the base with matching shape, and every
    target_modules name a module of the base; refuse naming the first that is not."""
    modules = {n[: -len(".weight")] for n in stored if n.endswith(".weight")}
    for a in adapters:
        for module, (A, B, _) in a.pairs.items():
            shape = stored.get(module + ".weight")
            if shape is None and module.endswith("lm_head") and any(n.endswith("embed_tokens.weight") for n in stored):
                raise GlmcError(f"--lora {a.path}: module {module}: this base ties lm_head to the embedding table, "
                                "and a LoRA on the tied lm_head is not supported")
            if shape is None:
                raise GlmcError(f"--lora {a.path}: module {module} is not in the base checkpoint "
                                "(an adapter for another model or layout?)")
            if tuple(shape) != (B.shape[0], A.shape[1]):
                raise GlmcError(f"--lora {a.path}: module {module} is {tuple(shape)} in the base but the adapter's "
                                f"B @ A is {(B.shape[0], A.shape[1])} (an adapter for another base?)")
        for name, t in a.replaced.items():
            if name not in stored:
                raise GlmcError(f"--lora {a.path}: modules_to_save tensor {name} is not in the base checkpoint")
            if tuple(stored[name]) != tuple(t.shape):
                raise GlmcError(f"--lora {a.path}: modules_to_save tensor {name} is {tuple(t.shape)}, the base's "
                                f"is {tuple(stored[name])}")
        targets = a.config.get("target_modules")
        if isinstance(targets, str):
            if not any(re.fullmatch(targets, m) for m in modules):
                raise GlmcError(f"--lora {a.path}: target_modules {targets!r} matches no module of the base")
        elif isinstance(targets, list):
            leaves = {m.rsplit(".", 1)[-1] for m in modules}
            for t in targets:
                if t not in leaves and not any(m == t or m.endswith("." + t) for m in modules):
                    raise GlmcError(f"--lora {a.path}: target module {t!r} is not a module of the base")


class _Merged:
    """A row reader of base tensor + sum of scale * B[r0:r1] @ A (fp32)."""

    def __init__(self, reader, parts: list[tuple]):
        self.reader, self.parts = reader, parts

    def __call__(self, name: str, r0: int, r1: int) -> torch.Tensor:
        rows = self.reader(name, r0, r1).to(torch.float32)
        for A, B, scaling in self.parts:
            rows = rows + scaling * (B[r0:r1].to(torch.float32) @ A.to(torch.float32))
        return rows


def merge(found: dict, adapters: list[Adapter]) -> dict:
    """found: stored name -> (reader(name, r0, r1), shape, dtype). Returns it with every
    adapter target's reader merged and modules_to_save replaced."""
    check_targets(adapters, {n: e[1] for n, e in found.items()})
    out = dict(found)
    parts: dict[str, list] = {}
    for a in adapters:
        for module, pair in a.pairs.items():
            parts.setdefault(module + ".weight", []).append(pair)
        for name, t in a.replaced.items():
            value = t.to(torch.float32)
            out[name] = (lambda n, r0, r1, v=value: v[r0:r1] if v.dim() else v, tuple(t.shape), torch.float32)
    for name, pairs in parts.items():
        reader, shape, _ = out[name]
        out[name] = (_Merged(reader, pairs), shape, torch.float32)
    return out


# ---------------------------------------------------------------------------- run-time slots

def slot_tables(adapter: Adapter, lora: dict, config: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An adapter laid out for an artifact's run-time slots (compile --lora-slots): per
    adapter linear of the manifest's backend.lora, (A (K, W), B (W, N)) with W = parts x rank,
    so that x @ A @ B is the adapter's delta of that (packed) linear's output.

    Part p of a linear (rows r0:r0+n of the packed weight, from one checkpoint tensor) gets
    rank block p: A's columns are that tensor's lora_A, B's rows its scaled lora_B rows for
    the part, as stored (a per-head chatglm query_key_value through block_rows)."""
    from glmc.chatglm import block_rows

    rank, stored = lora["rank"], lora["stored"]
    modules = {s[0][: -len(".weight")]: s for s in stored.values()}
    for module, (A, B, _) in adapter.pairs.items():
        if module not in modules:
            raise GlmcError(f"{adapter.path}: module {module} is not a decoder linear of this artifact (run-time "
                            "adapters apply to the decoder layers' linears; merge others with --lora at compile)")
        if A.shape[0] > rank:
            raise GlmcError(f"{adapter.path}: module {module} has rank {A.shape[0]}, above the artifact's "
                            f"--lora-rank {rank}")
    if adapter.replaced:
        raise GlmcError(f"{adapter.path}: modules_to_save ({', '.join(sorted(adapter.replaced)[:2])}) replace base "
                        "weights, which run-time slots cannot; merge this adapter with --lora at compile")
    shapes: dict[str, tuple] = {}          # stored tensor -> (rows, in_features): the rows its parts cover
    for lin in lora["linears"]:
        for name, _, n in lin["parts"]:
            st, start, _ = stored[name]
            shapes[st] = (max(shapes.get(st, (0,))[0], start + n), lin["in_features"])
    check_targets([adapter], shapes)
    order = None
    out = []
    for lin in lora["linears"]:
        K, N, parts = lin["in_features"], lin["out_features"], lin["parts"]
        A_t = torch.zeros(K, len(parts) * rank)
        B_t = torch.zeros(len(parts) * rank, N)
        for p, (name, r0, n) in enumerate(parts):
            st, start, per_head = stored[name]
            pair = adapter.pairs.get(st[: -len(".weight")])
            if pair is None:
                continue
            A, B, scaling = pair
            rows = torch.arange(start, start + n)
            if per_head:
                if order is None:
                    order = block_rows(config["num_attention_heads"], config["head_dim"])
                rows = order[rows]
            r = A.shape[0]
            A_t[:, p * rank: p * rank + r] = A.to(torch.float32).T
            B_t[p * rank: p * rank + r, r0: r0 + n] = scaling * B.to(torch.float32)[rows].T
        out.append((A_t, B_t))
    return out
