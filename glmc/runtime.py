"""glmc.load(path) -> Runtime: logits(), generate(), stream(), chat(), stream_chat().

The runtime is target-agnostic: it asks the artifact's backend for an executor
(new_cache / prefill / decode) and does batching, positions, sampling and
stopping itself. Generating N tokens costs one prefill and N-1 decode steps.

Sampling settings left as None take the checkpoint's generation_config.json defaults
stored in the artifact (temperature/top_p/top_k when it samples, max_new_tokens), else
greedy and 32 new tokens. Generation stops on any of the eos ids of config.json and
generation_config.json (GLM-4 lists three).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from glmc.artifact import read_manifest
from glmc.backends import get_backend
from glmc.errors import GlmcError
from glmc.sampling import check_sampling, choose
from glmc.tokenizer import open_codec


@dataclass(frozen=True)
class Token:
    id: int
    text: str | None   # the text this token adds (None without a tokenizer)


class Runtime:
    def __init__(self, path: str | os.PathLike, verify: bool = True, threads: int | None = None,
                 prefill_chunk: int | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, verify=verify)
        self.config = self.manifest["model"]["config"]
        self.vocab_size = self.config["vocab_size"]
        self.max_seq_len = self.manifest["max_seq_len"]
        eos = self.config.get("eos_token_id")
        text = self.manifest.get("text")
        self.generation: dict = dict((text or {}).get("generation") or {})
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.eos_ids |= set(self.generation.get("eos_token_id", []))
        self.pad_id = self.config.get("pad_token_id") or 0
        self.codec = open_codec(self.path, text)
        self.executor = get_backend(self.manifest["target"]).load(self.path, self.manifest, threads)
        # long prompts are prefilled in chunks of this many tokens (the size `glmc tune`
        # measured to keep the matmuls efficient); None or 0: one call
        if prefill_chunk is None:
            prefill_chunk = _tuned_chunk(self.path)
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 0):
            raise GlmcError(f"prefill_chunk must be an integer >= 0, got {prefill_chunk!r}")
        graphs = self.manifest.get("backend", {}).get("graphs", {})
        has_extend = "extend" in graphs or "step" in graphs      # an entry that continues a cache
        self.prefill_chunk = prefill_chunk if prefill_chunk and has_extend else None
        self.adapters: dict[str, int] = {}       # run-time adapter name -> slot (compile --lora-slots)

    # ---- run-time adapters --------------------------------------------------------------

    def _lora(self):
        tables = getattr(self.executor, "lora", None)
        if tables is None:
            raise GlmcError(f"{self.path}: the artifact has no run-time adapter slots (compile it with "
                            "--lora-slots N --lora-rank R, or merge the adapter with --lora)")
        return tables

    def add_adapter(self, name: str, path: str | os.PathLike, scale: float = 1.0, allow_pickle: bool = False) -> None:
        """Load a PEFT LoRA adapter into a free slot, for generate(..., adapter=name)."""
        from glmc.lora import read_adapter, slot_tables

        tables = self._lora()
        if not isinstance(name, str) or not name:
            raise GlmcError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise GlmcError(f"adapter {name!r} is already loaded (remove_adapter it first)")
        free = [s for s in range(1, tables.slots + 1) if s not in self.adapters.values()]
        if not free:
            raise GlmcError(f"all {tables.slots} adapter slots are in use ({', '.join(self.adapters)}); "
                            "remove_adapter one first")
        adapter = read_adapter(path, scale, allow_pickle)
        tables.write(free[0], slot_tables(adapter, tables.spec, self.config))
        self.adapters[name] = free[0]

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise GlmcError(f"no adapter named {name!r} is loaded")
        self._lora().write(self.adapters.pop(name), None)

    def _adapter_slots(self, adapter, batch: int) -> np.ndarray | None:
        """adapter: None, a name for every row, or one name (or None) per row -> slot per row."""
        if adapter is None:
            return None
        names = [adapter] * batch if isinstance(adapter, str) else adapter
        if not isinstance(names, Sequence) or len(names) != batch:
            raise GlmcError(f"adapter must be a name or one name (or None) per prompt ({batch}), got {adapter!r}")
        self._lora()
        unknown = [a for a in names if a is not None and a not in self.adapters]
        if unknown:
            loaded = ", ".join(self.adapters) or "none"
            raise GlmcError(f"no adapter named {unknown[0]!r} is loaded (loaded: {loaded}); add_adapter it first")
        return np.array([0 if a is None else self.adapters[a] for a in names], np.int64)

    # ---- inputs -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self.codec is None:
            raise GlmcError(f"{self.path}: the artifact has no tokenizer; pass token ids instead of text")
        return self.codec.encode(text)

    def decode_text(self, ids: Sequence[int]) -> str:
        if self.codec is None:
            raise GlmcError(f"{self.path}: the artifact has no tokenizer")
        return self.codec.decode(list(ids))

    def _prompts(self, prompts, max_new_tokens: int) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, Sequence) and prompts and all(isinstance(t, (int, np.integer)) for t in prompts):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)) or not prompts:
            raise GlmcError("expected a prompt (text or a list of token ids) or a non-empty batch of them")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise GlmcError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        out = []
        for i, p in enumerate(prompts):
            ids = self.encode(p) if isinstance(p, str) else p
            if isinstance(ids, np.ndarray):
                ids = ids.tolist()
            if not isinstance(ids, Sequence) or len(ids) == 0:
                raise GlmcError(f"prompt {i} is empty")
            bad = [t for t in ids if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
            if bad:
                raise GlmcError(f"prompt {i}: token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")
            if len(ids) + max_new_tokens > self.max_seq_len:
                raise GlmcError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                    f"artifact's max length {self.max_seq_len} (recompile with a larger --max-seq-len)"
                )
            out.append([int(t) for t in ids])
        return out

    def _pad(self, prompts: list[list[int]]):
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = np.full((B, T), self.pad_id, np.int64)
        mask = np.zeros((B, T), np.int64)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
            mask[b, : len(p)] = 1
        return ids, mask

    def prefill(self, prompts: list[list[int]], adapter_slots: np.ndarray | None = None):
        """A fresh cache holding the prompts (row b with run-time adapter slot adapter_slots[b]),
        and (B, V) logits of each prompt's last token."""
        ids, mask = self._pad(prompts)
        cache = self.executor.new_cache(len(prompts))
        if adapter_slots is not None:
            cache.adapter_slot[:] = adapter_slots
        C, T = self.prefill_chunk, ids.shape[1]
        if not C or T <= C:
            return cache, self.executor.prefill(cache, ids, mask)
        # chunked: the first chunk by prefill, the rest by extend over the cache; each row's
        # logits come from the chunk holding its last real token
        lengths = mask.sum(1)
        bounds = list(range(0, T, C)) + [T]
        if bounds[-1] - bounds[-2] == 1:          # extend takes >= 2 tokens: fold a 1-token tail in
            del bounds[-2]
        last = np.empty((len(prompts), self.vocab_size), np.float32)
        for start, end in zip(bounds[:-1], bounds[1:]):
            if start == 0:
                logits = self.executor.prefill(cache, ids[:, :end], mask[:, :end])[:, None]   # (B, 1, V)
                rows = np.nonzero(lengths <= end)[0]
                last[rows] = logits[rows, 0]
                continue
            logits = self.executor.extend(cache, ids[:, start:end], mask[:, start:end], start)
            rows = np.nonzero((lengths > start) & (lengths <= end))[0]
            # (B, 1, V) when last_token_logits rewrote the extend graph, else (B, C, V)
            at = 0 if logits.shape[1] == 1 else lengths[rows] - 1 - start
            last[rows] = logits[rows, at]
        return cache, last

    # ---- API ----------------------------------------------------------------------------

    def logits(self, ids) -> np.ndarray | list[np.ndarray]:
        """Logits for every position: (T, V) for one prompt, a list of them for a batch."""
        single = isinstance(ids, str) or (isinstance(ids, Sequence) and ids and isinstance(ids[0], (int, np.integer)))
        prompts = self._prompts(ids, 0)
        logits = self.executor.score(*self._pad(prompts))
        out = [logits[b, : len(p)].copy() for b, p in enumerate(prompts)]
        return out[0] if single else out

    def _defaults(self, max_new_tokens, temperature, top_k, top_p):
        """Explicit settings, else the artifact's generation defaults, else greedy and 32 tokens."""
        g = self.generation
        return (32 if max_new_tokens is None and "max_new_tokens" not in g else
                g["max_new_tokens"] if max_new_tokens is None else max_new_tokens,
                g.get("temperature", 0.0) if temperature is None else temperature,
                g.get("top_k", 0) if top_k is None else top_k,
                g.get("top_p", 1.0) if top_p is None else top_p)

    def generate(self, prompts, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_at_eos: bool = True, adapter=None) -> list[list[int]]:
        """New tokens for each prompt of a batch (prompts may differ in length). adapter: a
        run-time adapter's name (add_adapter) for every row, or one name or None per prompt."""
        max_new_tokens, temperature, top_k, top_p = self._defaults(max_new_tokens, temperature, top_k, top_p)
        prompts = self._prompts(prompts, max_new_tokens)
        slots = self._adapter_slots(adapter, len(prompts))
        out: list[list[int]] = [[] for _ in prompts]
        for step in self._steps(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, slots=slots):
            for b, t in step.items():
                out[b].append(t)
        return out

    def stream(self, prompt, max_new_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop_at_eos: bool = True, adapter: str | None = None) -> Iterator[Token]:
        """Yield the tokens of one prompt as they are made."""
        max_new_tokens, temperature, top_k, top_p = self._defaults(max_new_tokens, temperature, top_k, top_p)
        prompts = self._prompts(prompt, max_new_tokens)
        if len(prompts) != 1:
            raise GlmcError("stream() takes one prompt; use generate() for a batch")
        yield from self._stream(prompts, max_new_tokens, temperature, top_k, top_p, seed,
                                self.eos_ids if stop_at_eos else set(), self._adapter_slots(adapter, 1))

    def _stream(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, slots=None) -> Iterator[Token]:
        made: list[int] = []
        shown = ""
        for step in self._steps(prompts, max_new_tokens, temperature, top_k, top_p, seed, True, stop, slots):
            t = step[0]
            made.append(t)
            text = None
            if self.codec is not None:
                full = self.codec.decode(made)
                # hold back an incomplete UTF-8 sequence until its last byte arrives
                if not full.endswith("\ufffd"):
                    text, shown = full[len(shown):], full
            yield Token(t, text)

    def chat_ids(self, messages) -> list[int]:
        """The conversation as token ids in the artifact's chat format, the assistant's turn open."""
        if self.codec is None:
            raise GlmcError(f"{self.path}: the artifact has no tokenizer, so it cannot chat")
        return self.codec.chat_ids(messages)

    def stream_chat(self, messages, max_new_tokens: int | None = None, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    adapter: str | None = None) -> Iterator[Token]:
        """Yield the assistant's reply to `messages` ([{"role", "content"}, ...]) token by token;
        it ends at an eos id or a token that opens another turn (not yielded)."""
        ids = self.chat_ids(messages)
        room = self.max_seq_len - len(ids)
        if room < 1:
            raise GlmcError(f"the conversation has {len(ids)} tokens; the artifact holds {self.max_seq_len} "
                            "(recompile with a larger --max-seq-len or drop earlier turns)")
        if max_new_tokens is None:
            limit = self.generation.get("max_new_tokens")
            if limit is None and "max_length" in self.generation:
                limit = self.generation["max_length"] - len(ids)
            max_new_tokens = room if limit is None else max(1, min(room, limit))
        _, temperature, top_k, top_p = self._defaults(max_new_tokens, temperature, top_k, top_p)
        prompts = self._prompts([ids], max_new_tokens)
        stop = self.eos_ids | self.codec.stop_ids()
        for tok in self._stream(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                self._adapter_slots(adapter, 1)):
            if tok.id in stop:
                return
            yield tok

    def chat(self, messages, max_new_tokens: int | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             adapter: str | None = None) -> str:
        """The assistant's reply to `messages`, as text."""
        ids = [t.id for t in self.stream_chat(messages, max_new_tokens, temperature, top_k, top_p, seed, adapter)]
        return self.codec.reply(self.codec.decode(ids))

    def _steps(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, stop=None, slots=None):
        """Yield {row: token} for each generated position, rows that are still running."""
        stop = self.eos_ids if stop is None else stop
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens == 0:
            return
        rng = np.random.default_rng(seed) if temperature > 0 else None
        cache, last = self.prefill(prompts, slots)                                  # last: (B, V)
        B = len(prompts)
        position = np.array([len(p) for p in prompts], np.int64)
        running = [True] * B
        for step in range(max_new_tokens):
            toks = np.full((B, 1), self.pad_id, np.int64)
            made = {}
            for b in range(B):
                if running[b]:
                    toks[b, 0] = made[b] = choose(last[b], rng, temperature, top_k, top_p)
                    if stop_at_eos and made[b] in stop:
                        running[b] = False
            yield made
            if step == max_new_tokens - 1 or not any(running):
                return
            last = self.executor.decode(cache, toks, position)[:, 0]
            position += 1


def _tuned_chunk(path: Path) -> int | None:
    from glmc.autotune import read_tuning

    chunk = read_tuning(path).get("prefill_chunk")
    return chunk if isinstance(chunk, int) and chunk >= 2 else None


def load(path: str | os.PathLike, verify: bool = True, threads: int | None = None,
         prefill_chunk: int | None = None) -> Runtime:
    return Runtime(path, verify=verify, threads=threads, prefill_chunk=prefill_chunk)
