"""Load a GLM checkpoint directory or a preset into transformers' own model class.

Supported: model_type `glm` (GlmForCausalLM), `glm4` (Glm4ForCausalLM) and the
original `chatglm` layout (mapped onto glm, see glmc/chatglm.py). Weights come
from safetensors only (single file or sharded with model.safetensors.index.json);
nothing in the checkpoint directory is ever imported or executed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmc import chatglm
from glmc.dtypes import torch_dtype
from glmc.errors import GlmcError, warn
from glmc.modelcfg import head_dim
from glmc.settings import memory_limit_bytes
from glmc.presets import get_preset
from glmc.safetensors_check import data_start, read_header
from glmc.tokenizer import TextSpec, byte_tokenizer_json, preset_text_spec, read_text_spec
from glmc.weights import ST_DTYPES

SUPPORTED_MODEL_TYPES = ("glm", "glm4", "chatglm")
# gated MLP activations: silu -> fuse_swiglu; gelu (erf) and gelu_pytorch_tanh -> fuse_gelu_mlp;
# gelu_new (tanh written out as elementwise ops) compiles unfused
HIDDEN_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class LoadedModel:
    model: torch.nn.Module          # transformers GlmForCausalLM / Glm4ForCausalLM, eval, fp32
    model_type: str                 # glm | glm4 (after normalising chatglm)
    source_layout: str              # glm | glm4 | chatglm
    config: dict                    # the normalised transformers config dict
    source: dict                    # {kind, name, sha256}
    tokenizer_json: str | None = None
    warnings: list[str] = field(default_factory=list)
    text: "TextSpec | None" = None      # tokenizer files, chat format, generation defaults
    # the checkpoint's tensors by glm name, read on demand (set by `open_model`; its model's
    # parameters are then uninitialised memory that only tracing may look at)
    tensors: "TensorSource | None" = None
    weights_in_model: bool = True
    per_head_qkv: bool = False          # chatglm query_key_value packed [q_h; k_h; v_h] per head

    def parameter_count(self) -> int:
        return count_parameters(dict(self.config, model_type=self.model_type))


class TensorSource:
    """A checkpoint's tensors by glm name, read (rows r0:r1, as stored) only when asked.

    entries: glm name -> (read(stored_name, r0, r1), stored name, first row, shape, dtype)."""

    def __init__(self, entries: dict):
        self.entries = entries

    def __contains__(self, name):
        return name in self.entries

    def read(self, name: str, r0: int, r1: int) -> torch.Tensor:
        reader, stored, start, shape, _ = self.entries[name]
        return reader(stored, start + r0, start + r1) if shape else reader(stored, 0, 0)

    def lazy(self, name: str):
        from glmc.weights import Source

        _, _, _, shape, _ = self.entries[name]
        return Source(name, tuple(shape), self.read)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor as fp32 (checked finite)."""
        return self.lazy(name).full()

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix` (e.g. one decoder layer), fp32, keys without the prefix."""
        return {n[len(prefix):]: self.tensor(n) for n in self.entries if n.startswith(prefix)}


def _config_class(model_type: str):
    import transformers

    return {"glm": transformers.GlmConfig, "glm4": transformers.Glm4Config}[model_type]


def _model_class(model_type: str):
    import transformers

    return {"glm": transformers.GlmForCausalLM, "glm4": transformers.Glm4ForCausalLM}[model_type]


def build_config(cfg: dict):
    """A transformers config from a glm/glm4 dict, refusing what glmc cannot honour."""
    model_type = cfg.get("model_type")
    cfg = dict(cfg)
    cls = _config_class(model_type)
    try:
        config = cls.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise GlmcError(f"config.json cannot be read as a {model_type} config: {e}") from None
    _check_config(config)
    config._attn_implementation = "eager"
    return config


def _check_config(c) -> None:
    def positive(name):
        v = getattr(c, name, None)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise GlmcError(f"config.json: {name} must be a positive integer, got {v!r}")
        return v

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        positive(name)
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    if heads % kv:
        raise GlmcError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise GlmcError(f"config.json: head_dim={head_dim!r} must be a positive even integer")
    if getattr(c, "head_dim", None) is None and c.hidden_size % heads:
        raise GlmcError(f"config.json: hidden_size={c.hidden_size} is not divisible by num_attention_heads={heads}")
    rope = c.rope_parameters or {}
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise GlmcError(f"config.json: rope_type {kind!r} is not supported (default and linear rotary are)")
    if kind == "linear" and not (isinstance(rope.get("factor"), (int, float)) and rope["factor"] > 0):
        raise GlmcError(f"config.json: linear rope scaling needs a positive factor, got {rope.get('factor')!r}")
    factor = rope.get("partial_rotary_factor", 1.0)
    rot = int(head_dim * factor)
    if not 0 < factor <= 1 or rot % 2:
        raise GlmcError(f"config.json: partial_rotary_factor={factor} gives an odd or empty rotary dim for head_dim={head_dim}")
    if c.hidden_act not in HIDDEN_ACTS:
        raise GlmcError(f"config.json: hidden_act={c.hidden_act!r} is not supported "
                        f"(supported: {', '.join(HIDDEN_ACTS)})")
    eps = c.rms_norm_eps
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise GlmcError(f"config.json: rms_norm_eps={eps!r} must be a positive number")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GlmcError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GlmcError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise GlmcError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise GlmcError(f"{path}: expected a JSON object")
    return data


def weight_files(ckpt: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files of a checkpoint, validated to stay inside it (safetensors win
    over pickle files; pickle files only with allow_pickle)."""
    index = ckpt / "model.safetensors.index.json"
    single = ckpt / "model.safetensors"
    root = ckpt.resolve()
    if index.exists():
        weight_map = _read_json(index, "sharded index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise GlmcError(f"{index}: has no weight_map")
        files = []
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or os.path.isabs(shard) or ".." in Path(shard).parts:
                raise GlmcError(f"{index}: shard path {shard!r} escapes the checkpoint directory")
            p = ckpt / shard
            if not p.resolve().is_relative_to(root):
                raise GlmcError(f"{index}: shard {shard!r} is a link out of the checkpoint directory")
            if not p.is_file():
                raise GlmcError(f"{index}: names shard {shard!r}, which is missing")
            files.append(p)
        return files
    if single.exists():
        if not single.resolve().is_relative_to(root):
            raise GlmcError(f"{single}: is a link out of the checkpoint directory")
        return [single]
    shards = sorted(ckpt.glob("*.safetensors"))
    if shards:
        return shards
    pickles = [p.name for p in ckpt.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles and allow_pickle:
        files = [ckpt / name for name in sorted(pickles)]
        for p in files:
            if not p.resolve().is_relative_to(root):
                raise GlmcError(f"{p}: is a link out of the checkpoint directory")
        return files
    if pickles:
        raise GlmcError(
            f"{ckpt}: only pickle weights ({', '.join(sorted(pickles))}); glmc loads safetensors only. "
            "Convert with: python -c \"import torch,safetensors.torch as s; "
            "s.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\" "
            "(or pass --allow-pickle to load it with torch.load(weights_only=True))"
        )
    raise GlmcError(f"{ckpt}: no model.safetensors or *.safetensors weights")


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _source(ckpt: Path, files: list[Path], rope_ratio_as: str | None, adapters=()) -> dict:
    out = {"kind": "checkpoint", "name": str(ckpt.resolve()), "sha256": _sha256_files([ckpt / "config.json", *files])}
    if rope_ratio_as is not None:
        out["rope_ratio_as"] = rope_ratio_as
    if adapters:
        out["adapters"] = [a.describe() for a in adapters]
    return out


def _adapter_notes(ckpt: Path, adapters) -> list[str]:
    """A base directory that also holds a LoRA adapter: say so unless adapters were given."""
    from glmc import lora

    if adapters or not lora.is_adapter_dir(ckpt):
        return []
    message = (f"{ckpt} also holds a LoRA adapter (adapter_config.json) that is not applied; "
               f"pass --lora {ckpt} to merge it")
    warn(message)
    return [message]


def _sha256_state(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, torch.Tensor] = {}
    for p in files:
        if p.suffix in _PICKLE_SUFFIXES:
            _read_pickle(p, tensors)
            continue
        read_header(p)
        try:
            with safe_open(p, framework="pt") as f:
                for name in f.keys():
                    if name in tensors:
                        raise GlmcError(f"{p}: tensor '{name}' appears in more than one shard")
                    tensors[name] = f.get_tensor(name)
        except SafetensorError as e:
            raise GlmcError(f"{p}: unreadable safetensors ({e})") from None
    return tensors


def _read_pickle(p: Path, tensors: dict) -> None:
    """--allow-pickle: torch.load with weights_only=True (tensors and plain containers only;
    any other object in the pickle is refused by torch, never constructed)."""
    import pickle

    try:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:      # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GlmcError(f"{p}: refused by torch.load(weights_only=True): {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise GlmcError(f"{p}: not a state dict of named tensors")
    for name, t in state.items():
        if name in tensors:
            raise GlmcError(f"{p}: tensor '{name}' appears in more than one file")
        tensors[name] = t


def _dtype_warnings(raw: dict, tensors: dict, where: Path) -> list[str]:
    """A config dtype that contradicts the stored tensors: warn (weights load as fp32 either way)."""
    declared = raw.get("torch_dtype") or raw.get("dtype")
    stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if not isinstance(declared, str) or declared not in ("float32", "float16", "bfloat16") or not stored:
        return []
    if stored != {torch_dtype(declared)}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in stored))
        message = f"{where}: dtype {declared} contradicts the tensors ({names}); loading the tensors as stored"
        warn(message)
        return [message]
    return []


def count_parameters(cfg: dict) -> int:
    """Parameters a GLM config implies (before reading any weights)."""
    V, H, I, L = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    D = head_dim(cfg)
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    per_layer = H * (q + 2 * kv) + q * H + 3 * H * I + 2 * H
    if cfg.get("attention_bias"):
        per_layer += q + 2 * kv
    if cfg.get("model_type") == "glm4":
        per_layer += 2 * H           # post-attention / post-mlp norms
    return V * H * (1 if cfg.get("tie_word_embeddings") else 2) + H + L * per_layer


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (GLMC_MEMORY_LIMIT_GB overrides it), None if unknown."""
    limit = memory_limit_bytes()
    if limit is not None:
        return limit
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(cfg: dict, where: str, bytes_per_param: float, what: str) -> None:
    """Refuse up front (with the estimate) a model this machine cannot hold."""
    need = count_parameters(cfg) * bytes_per_param
    have = available_memory_bytes()
    if have is not None and need > have:
        raise GlmcError(f"{where}: {what} needs about {need / 2**30:.1f} GiB ({count_parameters(cfg) / 1e6:.0f}M "
                        f"parameters x {bytes_per_param:g} bytes), this machine has {have / 2**30:.1f} GiB available")


def _assign_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str, tied: bool) -> None:
    expected = model.state_dict()
    if tied:
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise GlmcError(f"{where}: missing tensors {', '.join(missing[:3])}{more}")
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise GlmcError(f"{where}: unexpected tensors {', '.join(unexpected[:3])}{more}")
    for name, ref in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise GlmcError(f"{where}: tensor '{name}' has shape {tuple(t.shape)}, config implies {tuple(ref.shape)}")
        if not t.dtype.is_floating_point:
            raise GlmcError(f"{where}: tensor '{name}' has non-float dtype {t.dtype}")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise GlmcError(f"{where}: tensor '{name}' contains NaN or Inf")
        tensors[name] = t
    if tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)


def _new_model(model_type: str, config) -> torch.nn.Module:
    return _model_class(model_type)(config).eval().to(torch.float32)


def load(spec: str | os.PathLike, allow_pickle: bool = False, bytes_per_param: float = 8.0,
         purpose: str = "loading", rope_ratio_as: str | None = None, adapters=()) -> LoadedModel:
    """Load MODEL (checkpoint directory or preset name) as transformers' eager model.

    Refuses up front, before reading weights, a model needing more than `bytes_per_param`
    x parameters of memory than the machine has available."""
    path = Path(spec)
    if path.is_dir():
        return _load_checkpoint(path, allow_pickle, bytes_per_param, purpose, rope_ratio_as, adapters)
    if path.exists():
        raise GlmcError(f"{path}: is a file; MODEL must be a checkpoint directory or a preset name")
    if os.sep in str(spec) or str(spec).startswith("."):
        raise GlmcError(f"{spec}: no such checkpoint directory")
    if rope_ratio_as is not None:
        raise GlmcError("--rope-ratio-as applies to chatglm checkpoints, not to presets")
    if adapters:
        raise GlmcError("--lora applies to checkpoint directories, not to presets")
    return _load_preset(str(spec), bytes_per_param, purpose)


def _load_preset(name: str, bytes_per_param: float = 8.0, purpose: str = "loading") -> LoadedModel:
    preset = get_preset(name)
    check_memory(dict(preset.config), name, bytes_per_param, purpose)
    config = build_config(preset.config)
    torch.manual_seed(preset.seed)
    model = _new_model("glm", config)
    cfg = config.to_dict()
    return LoadedModel(
        model=model, model_type="glm", source_layout="glm", config=cfg,
        source={"kind": "preset", "name": name, "sha256": _sha256_state(model.state_dict())},
        tokenizer_json=(tok := byte_tokenizer_json(config.vocab_size)), text=preset_text_spec(tok, cfg),
    )


def _read_config(ckpt: Path, rope_ratio_as: str | None = None) -> tuple:
    """config.json -> (raw dict as glm, source layout, model_type, transformers config, notes,
    per_head_qkv: a chatglm query_key_value packed per head)."""
    from glmc import lora

    if not (ckpt / "config.json").is_file() and lora.is_adapter_dir(ckpt):
        try:
            base = json.loads((ckpt / "adapter_config.json").read_text()).get("base_model_name_or_path") or "BASE"
        except (OSError, ValueError):
            base = "BASE"
        raise GlmcError(f"{ckpt} is a PEFT LoRA adapter, not a model; compile its base with it merged: "
                        f"glmc compile {base} --lora {ckpt}")
    raw = _read_json(ckpt / "config.json", "config.json")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GlmcError(
            f"{ckpt / 'config.json'}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    layout, notes, per_head = model_type, [], False
    if model_type == "chatglm":
        code = ckpt / "modeling_chatglm.py"
        per_head = chatglm.qkv_per_head(raw)
        raw, notes = chatglm.config_from_chatglm(raw, code.read_text(errors="replace") if code.is_file() else None,
                                                 rope_ratio_as)
        model_type = "glm"
    elif rope_ratio_as is not None:
        raise GlmcError(f"--rope-ratio-as applies to chatglm checkpoints; {ckpt} is model_type {model_type!r}")
    config = build_config(raw)
    return raw, layout, model_type, config, notes, per_head


def _load_checkpoint(ckpt: Path, allow_pickle: bool = False, bytes_per_param: float = 8.0,
                     purpose: str = "loading", rope_ratio_as: str | None = None, adapters=()) -> LoadedModel:
    raw, layout, model_type, config, notes, per_head = _read_config(ckpt, rope_ratio_as)
    cfg = config.to_dict()
    check_memory(dict(cfg, model_type=model_type), str(ckpt), bytes_per_param, purpose)
    files = weight_files(ckpt, allow_pickle)
    tensors = _read_tensors(files)
    dtype_notes = _dtype_warnings(raw, tensors, ckpt / "config.json")
    if adapters or per_head:
        found = {n: (_in_memory(t), tuple(t.shape), t.dtype) for n, t in tensors.items()}
        wrapped = _stored_readers(found, cfg, per_head, adapters)
        tensors = {n: reader(n, 0, shape[0]) if shape else reader(n, 0, 0)
                   for n, (reader, shape, _) in wrapped.items()}
    if layout == "chatglm":
        tensors = chatglm.weights_from_chatglm(tensors, cfg)
    warnings = notes + dtype_notes
    model = _new_model(model_type, config)
    _assign_weights(model, tensors, str(ckpt), tied=bool(config.tie_word_embeddings))
    tok = ckpt / "tokenizer.json"
    text = read_text_spec(ckpt, raw)
    warnings += _adapter_notes(ckpt, adapters)
    return LoadedModel(warnings=warnings + (text.notes if text else []), text=text,
        model=model, model_type=model_type, source_layout=layout, config=cfg,
        source=_source(ckpt, files, rope_ratio_as, adapters),
        tokenizer_json=tok.read_text() if tok.is_file() else None,
    )



def _empty_model(model_type: str, config) -> torch.nn.Module:
    """transformers' model with uninitialised parameters (never touched, so never resident);
    the rotary buffers, computed from the config, are real."""
    with torch.device("meta"):
        model = _model_class(model_type)(config).eval()
    model.to_empty(device="cpu")
    rotary = type(model.model.rotary_emb)(config)
    model.model.rotary_emb = rotary
    return model


def _safetensors_entries(files: list[Path]) -> dict:
    """stored name -> (reader, shape, dtype), from the headers only. Rows are read with pread
    into fresh memory, never through a memory map: mapped checkpoint pages would stay in the
    process's resident set, and a compile would hold the checkpoint it streams."""
    found = {}
    for p in files:
        if p.suffix in _PICKLE_SUFFIXES:
            state: dict = {}
            _read_pickle(p, state)
            for name, t in state.items():
                if name in found:
                    raise GlmcError(f"{p}: tensor '{name}' appears in more than one file")
                found[name] = (_in_memory(t), tuple(t.shape), t.dtype)
            continue
        header = read_header(p)
        base = data_start(p)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in found:
                raise GlmcError(f"{p}: tensor '{name}' appears in more than one shard")
            dtype = ST_DTYPES.get(info["dtype"])
            shape = tuple(info["shape"])
            found[name] = (_RowReader(p, base + info["data_offsets"][0], shape, dtype), shape, dtype)
    return found


def _in_memory(t: torch.Tensor):
    """A TensorSource reader of a tensor already in memory."""
    return lambda name, r0, r1: t[r0:r1] if t.dim() else t


class _RowReader:
    """Rows r0:r1 of one stored tensor, read with os.pread."""

    def __init__(self, path: Path, offset: int, shape: tuple, dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype

    def __call__(self, name: str, r0: int, r1: int) -> torch.Tensor:
        if self.dtype is None:
            raise GlmcError(f"{self.path}: tensor '{name}' has a dtype glmc cannot read")
        item = torch.empty((), dtype=self.dtype).element_size()
        rest = self.shape[1:] if self.shape else ()
        row = item * math.prod(rest)
        if not self.shape:
            r0, r1, rest = 0, 1, ()
        out = torch.empty((r1 - r0, *rest), dtype=self.dtype)
        view = out.view(torch.uint8).numpy().reshape(-1) if out.numel() else None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done, want = 0, (r1 - r0) * row
            while done < want:
                n = os.preadv(fd, [memoryview(view)[done:]], self.offset + r0 * row + done)
                if n <= 0:
                    raise GlmcError(f"{self.path}: truncated while reading tensor '{name}'")
                done += n
        except OSError as e:
            raise GlmcError(f"{self.path}: cannot read tensor '{name}' ({e.strerror})") from None
        finally:
            os.close(fd)
        return out if self.shape else out.reshape(())


class _Permuted:
    """A TensorSource reader whose row r is stored row rows[r] (contiguous runs read at once)."""

    def __init__(self, reader, rows: torch.Tensor):
        self.reader, self.rows = reader, rows

    def __call__(self, name: str, r0: int, r1: int) -> torch.Tensor:
        want = self.rows[r0:r1].tolist()
        parts, start = [], 0
        for i in range(1, len(want) + 1):
            if i == len(want) or want[i] != want[i - 1] + 1:
                parts.append(self.reader(name, want[start], want[i - 1] + 1))
                start = i
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _stored_readers(found: dict, cfg: dict, per_head: bool, adapters) -> dict:
    """The stored tensors' readers as glm's mapping wants them: LoRA adapters merged (on the
    stored rows, which their B matrices index), then a per-head packed query_key_value read
    as [q; k; v] blocks. found: name -> (reader(name, r0, r1), shape, dtype)."""
    if adapters:
        from glmc import lora

        found = lora.merge(found, adapters)
    if per_head:
        rows = chatglm.block_rows(cfg["num_attention_heads"], cfg["head_dim"])
        found = {n: (_Permuted(e[0], rows), *e[1:]) if ".query_key_value." in n and e[1] and e[1][0] == len(rows)
                 else e for n, e in found.items()}
    return found


def _map_entries(found: dict, layout: str, cfg: dict, where: str, expected: dict, tied: bool) -> TensorSource:
    """Rename (and for chatglm split) the stored tensors onto the model's names, checking names,
    shapes and dtypes against the model without reading any data."""
    metas = {n: torch.empty(shape, dtype=dt or torch.float32, device="meta") for n, (_, shape, dt) in found.items()}
    origin = {id(t): n for n, t in metas.items()}
    mapped = chatglm.weights_from_chatglm(metas, cfg) if layout == "chatglm" else dict(metas)
    if tied:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
        mapped.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    for names, what in ((missing, "missing"), (unexpected, "unexpected")):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise GlmcError(f"{where}: {what} tensors {', '.join(names[:3])}{more}")
    entries = {}
    for name, ref_shape in expected.items():
        t = mapped[name]
        if tuple(t.shape) != tuple(ref_shape):
            raise GlmcError(f"{where}: tensor '{name}' has shape {tuple(t.shape)}, config implies {tuple(ref_shape)}")
        stored_dtype = found[origin[id(t._base if t._base is not None else t)]][2]
        if stored_dtype is None or not stored_dtype.is_floating_point:
            raise GlmcError(f"{where}: tensor '{name}' has non-float dtype {stored_dtype}")
        base = t._base if t._base is not None else t
        stored = origin[id(base)]
        start = t.storage_offset() // base.stride(0) if t.dim() and base.dim() else 0
        entries[name] = (found[stored][0], stored, start, tuple(t.shape), stored_dtype)
    if tied:
        entries["lm_head.weight"] = entries["model.embed_tokens.weight"]
    return TensorSource(entries)


def open_model(spec: str | os.PathLike, allow_pickle: bool = False, purpose: str = "compiling",
               need_bytes=None, rope_ratio_as: str | None = None, adapters=()) -> LoadedModel:
    """MODEL as a traceable transformers model plus its tensors read on demand (`tensors`).

    A preset is built in memory as `load` does. A checkpoint's model has uninitialised
    parameters; its tensors are checked from the safetensors headers (names, shapes, dtypes)
    and read, a row range at a time, only when a weight is written or a layer verified.
    need_bytes(cfg) -> bytes this needs; refused up front when the machine has less."""
    path = Path(spec)
    if not path.is_dir():
        if not path.exists() and os.sep not in str(spec) and not str(spec).startswith(".") and need_bytes:
            cfg = dict(get_preset(str(spec)).config)          # a preset lives in memory: + its fp32 weights
            _refuse_beyond(need_bytes(cfg) + 4 * count_parameters(cfg), str(spec), purpose, count_parameters(cfg))
        loaded = load(spec, allow_pickle=allow_pickle, bytes_per_param=0.0, purpose=purpose, rope_ratio_as=rope_ratio_as,
                      adapters=adapters)
        state = loaded.model.state_dict()
        loaded.tensors = TensorSource({n: (_in_memory(t), n, 0, tuple(t.shape), t.dtype)
                                       for n, t in state.items()})
        return loaded
    raw, layout, model_type, config, notes, per_head = _read_config(path, rope_ratio_as)
    cfg = config.to_dict()
    if need_bytes is not None:
        c = dict(cfg, model_type=model_type)
        _refuse_beyond(need_bytes(c), str(path), purpose, count_parameters(c))
    files = weight_files(path, allow_pickle)
    found = _safetensors_entries(files)
    metas = {n: torch.empty(0, dtype=dt or torch.float32) for n, (_, _, dt) in found.items()}
    found = _stored_readers(found, cfg, per_head, adapters)
    model = _empty_model(model_type, config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    tensors = _map_entries(found, layout, cfg, str(path), expected, bool(config.tie_word_embeddings))
    warnings = notes + _dtype_warnings(raw, metas, path / "config.json") + _adapter_notes(path, adapters)
    tok = path / "tokenizer.json"
    text = read_text_spec(path, raw)
    loaded = LoadedModel(text=text,
        model=model, model_type=model_type, source_layout=layout, config=cfg,
        source=_source(path, files, rope_ratio_as, adapters),
        tokenizer_json=tok.read_text() if tok.is_file() else None, warnings=warnings + (text.notes if text else []),
        tensors=tensors,
        weights_in_model=False, per_head_qkv=per_head)
    return loaded


def _refuse_beyond(need: float, where: str, what: str, params: int) -> None:
    have = available_memory_bytes()
    if have is not None and need > have:
        raise GlmcError(f"{where}: {what} needs about {need / 2**30:.1f} GiB ({params / 1e6:.0f}M parameters), "
                        f"this machine has {have / 2**30:.1f} GiB available")
