"""Write a random-weight GLM checkpoint of a real model's shape, streaming, as sharded
safetensors that glmc (and transformers) load like a downloaded one.

    python tools/make_checkpoint.py glm4-9b /data/glm4-9b-random            # ~18.8 GB bf16
    python tools/make_checkpoint.py chatglm3-6b out/ --layers 2             # the width, fewer layers

Tensor names and shapes come from transformers' GlmForCausalLM built on the meta
device (no memory); each tensor is generated in blocks straight into its bf16
buffer and written with its shard, so the process holds one shard (--shard-gb,
default 1; a tensor bigger than that is a shard of its own) and safetensors'
serialised copy of it: its memory does not grow with the number of layers.
Measured here for glm4-9b (9.40B parameters, 18.8 GB in 19 shards): 112 s, peak
RSS 2.5 GB (the 1.24 GB embedding / lm_head shards, twice).
Values: N(0, 0.02) weights, N(0, 0.02) biases, norms 1 + N(0, 0.02); each tensor
seeded from (--seed, its name), so any subset of a checkpoint is reproducible.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

# shapes of the released models (config.json of each), as transformers' glm config
SHAPES = {
    "glm4-9b": dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
                    head_dim=128, intermediate_size=13696, vocab_size=151552, max_position_embeddings=131072,
                    attention_bias=True, partial_rotary_factor=0.5, rope_theta=10000.0, rms_norm_eps=1.5625e-07,
                    pad_token_id=151329, eos_token_id=[151329, 151336, 151338], bos_token_id=None),
    "chatglm3-6b": dict(hidden_size=4096, num_hidden_layers=28, num_attention_heads=32, num_key_value_heads=2,
                        head_dim=128, intermediate_size=13696, vocab_size=65024, max_position_embeddings=8192,
                        attention_bias=True, partial_rotary_factor=0.5, rope_theta=10000.0, rms_norm_eps=1e-5,
                        pad_token_id=0, eos_token_id=2, bos_token_id=1),
    "glm-2b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=2,
                   head_dim=128, intermediate_size=6912, vocab_size=151552, max_position_embeddings=32768,
                   attention_bias=True, partial_rotary_factor=0.5, rope_theta=10000.0, rms_norm_eps=1e-5,
                   pad_token_id=151329, eos_token_id=151329, bos_token_id=None),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCK_ELEMENTS = 1 << 24           # generate 16M values (64 MB of fp32) at a time


def glm_config(shape: str, layers: int | None = None, hidden: int | None = None, vocab: int | None = None,
               intermediate: int | None = None):
    import transformers

    spec = dict(SHAPES[shape])
    for key, value in (("num_hidden_layers", layers), ("hidden_size", hidden), ("vocab_size", vocab),
                       ("intermediate_size", intermediate)):
        if value is not None:
            spec[key] = value
    last = spec["vocab_size"] - 1
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):     # ids beyond a smaller vocabulary
        if isinstance(spec.get(key), int):
            spec[key] = min(spec[key], last)
        elif isinstance(spec.get(key), list):
            spec[key] = sorted({min(i, last) for i in spec[key]})
    rope = {"rope_type": "default", "rope_theta": spec.pop("rope_theta"),
            "partial_rotary_factor": spec.pop("partial_rotary_factor")}
    return transformers.GlmConfig(rope_parameters=rope, tie_word_embeddings=False, **spec)


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of GlmForCausalLM(config), in its state_dict order."""
    import transformers

    with torch.device("meta"):
        model = transformers.GlmForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    gen = _generator(seed, name)
    base = 1.0 if name.endswith("norm.weight") else 0.0
    for start in range(0, flat.numel(), BLOCK_ELEMENTS):
        n = min(BLOCK_ELEMENTS, flat.numel() - start)
        flat[start:start + n] = torch.randn(n, generator=gen).mul_(0.02).add_(base)
    return out


def shard_plan(specs, itemsize: int, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most shard_bytes (a bigger tensor alone)."""
    shards, current, size = [], [], 0
    for name, shape in specs:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_checkpoint(out: Path, config, dtype: str = "bf16", shard_gb: float = 1.0, seed: int = 0,
                     progress=None) -> dict:
    """Write config.json, model-XXXXX-of-YYYYY.safetensors and model.safetensors.index.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    specs = tensor_specs(config)
    plan = shard_plan(specs, itemsize, int(shard_gb * 2**30))
    weight_map, total = {}, 0
    for i, shard in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, torch_dtype, seed) for name, shape in shard}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * itemsize
        del tensors
        if progress:
            progress(f"{fname}: {len(shard)} tensors")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg = config.to_dict()
    cfg["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    params = sum(int(torch.Size(s).numel()) for _, s in specs)
    return {"parameters": params, "bytes": total, "shards": len(plan)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=None, help="Override the number of layers.")
    p.add_argument("--hidden", type=int, default=None, help="Override the hidden size.")
    p.add_argument("--vocab", type=int, default=None, help="Override the vocabulary size.")
    p.add_argument("--intermediate", type=int, default=None, help="Override the MLP's intermediate size.")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--shard-gb", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    info = write_checkpoint(args.out, glm_config(args.shape, args.layers, args.hidden, args.vocab, args.intermediate), args.dtype, args.shard_gb,
                            args.seed, progress=lambda m: print(m, file=sys.stderr, flush=True))
    from glmc.measure import peak_rss_mb

    peak = peak_rss_mb()
    print(json.dumps(dict(info, shape=args.shape, seconds=round(time.perf_counter() - t0, 1),
                          peak_rss_mb=round(peak, 1))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
