"""Trace transformers' forward into two ATen graphs: prefill and decode.

Both entry points call only the model's public forward. The KV cache is explicit:

  prefill(input_ids (B,T) i64, attention_mask (B,T) i64)
      -> logits (B,T,V), k_0, v_0, ..., k_{L-1}, v_{L-1}     each (B,Hkv,T,D)
  decode(input_ids (B,1) i64, position (B,) i64, cache_mask (B,S) i64,
         past_k_0, past_v_0, ...)                              each (B,Hkv,S,D)
      -> logits (B,1,V), new_k_0, new_v_0, ...                  each (B,Hkv,1,D)
  extend(input_ids (B,C) i64, attention_mask (B,C) i64, position (B,) i64,
         cache_mask (B,S) i64, past_k_0, past_v_0, ...)        a prompt chunk after the cache
      -> logits (B,C,V), new_k_0, new_v_0, ...                  each (B,Hkv,C,D)

Prompts are right-padded: attention_mask marks real tokens, positions are
0..T-1 for every row. The decode cache has a fixed capacity S (max_seq_len); slot
j of row b is visible when cache_mask[b, j] is 1. The runtime writes new_k/new_v
into slot `position` of its own buffers, so no step copies the cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from glmc.modelcfg import head_dim
from torch.export import Dim


def _additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    # finfo.min rather than -inf: a fully masked row (padding) stays finite.
    zero = torch.zeros(allowed.shape, dtype=torch.float32)
    return zero.masked_fill(~allowed, torch.finfo(torch.float32).min)


class PrefillEntry(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, hidden_states: bool = False):
        super().__init__()
        self.model = model
        self.hidden_states = hidden_states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        B, T = input_ids.shape
        positions = torch.arange(T).unsqueeze(0).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)       # (B, T, T)
        out = self.model(
            input_ids=input_ids,
            attention_mask=_additive_mask(allowed).unsqueeze(1),                 # (B, 1, T, T)
            position_ids=positions,
            use_cache=True,
            output_hidden_states=self.hidden_states,
        )
        kv = []
        for layer in out.past_key_values.layers:
            kv += [layer.keys, layer.values]
        if self.hidden_states:
            return (out.logits, *kv, *out.hidden_states)
        return (out.logits, *kv)


class DecodeEntry(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position, cache_mask, *past):
        from transformers import DynamicCache

        B = input_ids.shape[0]
        n_layers = len(past) // 2
        cache = DynamicCache(
            ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)],
            config=self.model.config,
        )
        # the new token (last slot after the cache's concat) always sees itself
        allowed = torch.cat([cache_mask.bool(), torch.ones(B, 1, dtype=torch.bool)], dim=1)   # (B, S+1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=_additive_mask(allowed)[:, None, None, :],                        # (B, 1, 1, S+1)
            position_ids=position.unsqueeze(1),
            past_key_values=cache,
            use_cache=True,
        )
        kv = []
        for layer in out.past_key_values.layers:
            kv += [layer.keys[:, :, -1:], layer.values[:, :, -1:]]
        return (out.logits, *kv)


class ExtendEntry(torch.nn.Module):
    """C more prompt tokens at positions position..position+C-1 after a cache (chunked prefill)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position, cache_mask, *past):
        from transformers import DynamicCache

        B, C = input_ids.shape
        # the cache buffers have the artifact's whole capacity; cache_mask covers the slots in
        # use (any length up to the capacity), and only those are read
        S = cache_mask.shape[1]
        n_layers = len(past) // 2
        cache = DynamicCache(
            ddp_cache_data=[(past[2 * i][:, :, :S], past[2 * i + 1][:, :, :S]) for i in range(n_layers)],
            config=self.model.config,
        )
        causal = torch.ones(C, C, dtype=torch.bool).tril().unsqueeze(0) & attention_mask.bool().unsqueeze(1)
        allowed = torch.cat([cache_mask.bool().unsqueeze(1).expand(B, C, S), causal], dim=2)   # (B, C, S+C)
        out = self.model(
            input_ids=input_ids,
            attention_mask=_additive_mask(allowed).unsqueeze(1),                               # (B, 1, C, S+C)
            position_ids=position.unsqueeze(1) + torch.arange(C).unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
        )
        kv = []
        for layer in out.past_key_values.layers:
            kv += [layer.keys.narrow(2, S, C), layer.values.narrow(2, S, C)]
        return (out.logits, *kv)


@dataclass
class Traced:
    """One traced entry point: the graph and what it takes to re-export it."""

    name: str
    gm: torch.fx.GraphModule
    example_args: tuple
    dynamic_shapes: tuple           # flat, one dict per positional input
    input_names: list[str]
    output_names: list[str]


def _shape(config: dict):
    L = config["num_hidden_layers"]
    Hkv = config["num_key_value_heads"]
    D = head_dim(config)
    return L, Hkv, D


def _example_cache(L: int, Hkv: int, S: int, D: int) -> tuple:
    """Example KV-cache buffers for tracing: only their shapes are used, so they are never
    written and their pages never become resident (2 x 4 MiB per layer at the 9B shape)."""
    return tuple(torch.empty(2, Hkv, S, D) for _ in range(2 * L))


@contextlib.contextmanager
def export_settings():
    """What glmc's torch.export calls run under: no autograd, and no fake-tensor dispatch
    caching. Building the cache's entries costs more than its hits save (a 2-layer extend
    entry: 3.3-4.9 s with the cache, 1.3-2.1 s without; the 40-layer GLM-4-9B shape: 37-42 s
    with, 27-39 s without). The graph is the same either way."""
    with torch.no_grad(), torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        yield


def _export(entry: torch.nn.Module, args: tuple, dyn) -> torch.export.ExportedProgram:
    with export_settings():
        return torch.export.export(entry, args, dynamic_shapes=dyn, strict=False)


def kv_names(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}{kind}_{i}" for i in range(n_layers) for kind in ("k", "v")]


def trace_prefill(model, config: dict, max_seq_len: int, hidden_states: bool = False, name: str = "prefill") -> Traced:
    L, _, _ = _shape(config)
    # Dim.DYNAMIC for the length: torch 2.11's exporter adds a guard (min(64*seq, 512*seq) ==
    # 64*seq) that a named Dim's range check cannot prove; the runtime bounds prompts by the capacity
    B, T = Dim("batch", min=1, max=256), Dim.DYNAMIC
    args = (torch.randint(3, config["vocab_size"], (2, 5)), torch.ones(2, 5, dtype=torch.int64))
    dyn = ({0: B, 1: T}, {0: B, 1: T})
    ep = _export(PrefillEntry(model, hidden_states), args, dyn)
    outputs = ["logits", *kv_names("present_", L)]
    if hidden_states:
        outputs += [f"hidden_{i}" for i in range(L + 1)]
    return Traced(name, ep.module(), args, dyn, ["input_ids", "attention_mask"], outputs)


def trace_decode(model, config: dict, max_seq_len: int) -> Traced:
    L, Hkv, D = _shape(config)
    B = Dim("batch", min=1, max=256)
    S = max_seq_len
    past = _example_cache(L, Hkv, S, D)
    cache_mask = torch.zeros(2, S, dtype=torch.int64)
    cache_mask[:, :4] = 1
    args = (torch.randint(3, config["vocab_size"], (2, 1)), torch.tensor([4, 4]), cache_mask, *past)
    dyn = ({0: B}, {0: B}, {0: B}, tuple({0: B} for _ in past))
    ep = _export(DecodeEntry(model), args, dyn)
    flat_dyn = (dyn[0], dyn[1], dyn[2], *dyn[3])
    return Traced(
        "decode", ep.module(), args, flat_dyn,
        ["input_ids", "position", "cache_mask", *kv_names("past_", L)],
        ["logits", *kv_names("new_", L)],
    )


def trace_extend(model, config: dict, max_seq_len: int) -> Traced:
    L, Hkv, D = _shape(config)
    # Dim.DYNAMIC: the exporter adds a harmless guard on the cache-plus-chunk length that
    # a named Dim's range check cannot prove; the runtime bounds chunks by the capacity.
    # The cache buffers keep the capacity S; cache_mask's length (the slots in use) is dynamic.
    B, C, N = Dim("batch", min=1, max=256), Dim.DYNAMIC, Dim.DYNAMIC
    S = max_seq_len
    past = _example_cache(L, Hkv, S, D)
    cache_mask = torch.zeros(2, 5, dtype=torch.int64)
    cache_mask[:, :4] = 1
    args = (torch.randint(3, config["vocab_size"], (2, 3)), torch.ones(2, 3, dtype=torch.int64),
            torch.tensor([4, 4]), cache_mask, *past)
    dyn = ({0: B, 1: C}, {0: B, 1: C}, {0: B}, {0: B, 1: N}, tuple({0: B} for _ in past))
    ep = _export(ExtendEntry(model), args, dyn)
    flat_dyn = (dyn[0], dyn[1], dyn[2], dyn[3], *dyn[4])
    return Traced(
        "extend", ep.module(), args, flat_dyn,
        ["input_ids", "attention_mask", "position", "cache_mask", *kv_names("past_", L)],
        ["logits", *kv_names("new_", L)],
    )
