"""Run a CPU artifact with onnxruntime.

Generation runs on one onnxruntime session (one pre-packed copy of the weights; each
session packs its own): a prompt, a chunk of one and a decode step are all "C tokens
after a row's first slots".

The step entry (backends/cpu/lean.py; artifacts from now on): the KV cache is one
(B, Hkv, S, D) numpy buffer per layer for K and for V (S: the artifact's capacity),
wrapped once as OrtValues and bound as both past_* and present_*, so
GroupQueryAttention reads the filled slots and writes the new ones in place. A row's
tokens sit at slots 0..length-1. A decode step reuses one binding made on the first
step: it writes the new ids and lengths into arrays the binding already holds and runs;
the logits land in a buffer bound once.

The extend entry (artifacts the lean lowering declined, e.g. --kv-cache fp16): the same
buffers plus cache_mask for the slots in use; the graph slices the buffers to those
slots, and only the new tokens' K/V come back, written into their slots here.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from glmc.backends.cpu.linear16 import aligned_empty
from glmc.backends.kv import store_decode_kv, store_kv
from glmc.hugepages import collapsed, placed
from glmc.modelcfg import head_dim
from glmc.weights import release_pages


KERNEL_COPY_SHARE = 0.5    # glmc kernels' weights are copied onto 2 MB pages where they take at most
                           # this share of the memory available (the rest: the page cache's copy
                           # while loading, activations); a larger model streams from its mapping


def default_threads() -> int:
    """The CPUs this process may run on (what onnxruntime's pool should use)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def _paging_out(mm, every_s: float = 0.05):
    """Drop `mm`'s resident pages every `every_s` while the block runs (onnxruntime builds a
    session with the GIL released), and once after. A page read again faults back in from
    the page cache. Measured on the 8-layer 9B-width int4 artifact: the session build peaked
    at 3226 MiB (1758 packed + 1468 mapped) without this, 1978 MiB with it."""
    done = threading.Event()

    def drop():
        while not done.wait(every_s):
            release_pages(mm)

    thread = threading.Thread(target=drop, name="glmc-page-out", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        release_pages(mm)


def _tuned_threads(artifact_dir: Path) -> int | None:
    """The thread count `glmc tune` measured for this artifact (tuning.json), if any and still valid here."""
    from glmc.autotune import read_tuning

    tuned = read_tuning(artifact_dir).get("threads")
    return tuned if isinstance(tuned, int) and 1 <= tuned <= default_threads() else None


class KVCache:
    def __init__(self, batch: int, n_layers: int, kv_heads: int, capacity: int, head_dim: int, dtype=np.float32):
        shape = (batch, kv_heads, capacity, head_dim)
        # fp16 storage (--kv-cache fp16): new K/V arrive fp32 and are rounded as they are stored
        self.k = [np.zeros(shape, dtype) for _ in range(n_layers)]
        self.v = [np.zeros(shape, dtype) for _ in range(n_layers)]
        self.mask = np.zeros((batch, capacity), np.int64)   # 1 where a slot holds a real token
        self.batch, self.capacity = batch, capacity
        self.used = 0         # slots [0, used) may hold tokens: the only ones a step reads
        self.ort_past = [ort.OrtValue.ortvalue_from_numpy(a) for kv in zip(self.k, self.v) for a in kv]

    store = store_kv              # prefill / extend outputs into their slots
    store_step = store_decode_kv  # a decode step's one new token per row


class _StepBuffers:
    """A StepCache's memory: the K / V buffers, their OrtValues and the decode step's binding
    (with a split step's plan, runtime16.py). It outlives its cache: the executor hands it
    to the next cache of the same batch size (`CpuExecutor.new_cache`)."""

    def __init__(self, k: list, v: list):
        self.k, self.v = k, v
        self.kv = [a for pair in zip(k, v) for a in pair]          # k_0, v_0, k_1, ...
        self.ort_kv = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.kv]
        self.step = None            # the decode step's binding and the arrays it reads and writes


class StepCache:
    """The step entry's cache: per layer a K and a V buffer (B, Hkv, S, D), bound as past
    and present at once (GroupQueryAttention writes the new slots in place), and each
    row's length: its tokens sit at slots 0..length-1, positions equal to slots. Slots past
    a row's length are never read, so buffers handed on from a finished cache (`buffers`)
    need no clearing."""

    def __init__(self, batch: int, n_layers: int, kv_heads: int, capacity: int, head_dim: int,
                 buffers: _StepBuffers | None = None):
        shape = (batch, kv_heads, capacity, head_dim)
        if buffers is None:
            # 64-byte aligned: glmc's attention kernel (backends/cpu/attention.py) works on them in place
            buffers = _StepBuffers([aligned_empty(shape, np.float32, zeros=True) for _ in range(n_layers)],
                                   [aligned_empty(shape, np.float32, zeros=True) for _ in range(n_layers)])
        self._buffers = buffers
        self.k, self.v, self.kv, self.ort_kv = buffers.k, buffers.v, buffers.kv, buffers.ort_kv
        self.lengths = np.zeros(batch, np.int64)
        self.adapter_slot = np.zeros(batch, np.int64)       # each row's run-time adapter (0: none)
        self.batch, self.capacity = batch, capacity

    @property
    def step(self):
        return self._buffers.step

    @step.setter
    def step(self, value) -> None:
        self._buffers.step = value

    def rows(self, start: int, stop: int) -> "StepCache":
        """Rows [start, stop) as a cache of their own: the same memory, its own step binding (a
        server prefills the rows it admits and decodes only the rows in use)."""
        view = object.__new__(StepCache)
        view._buffers = _StepBuffers([a[start:stop] for a in self.k], [a[start:stop] for a in self.v])
        view.k, view.v, view.kv, view.ort_kv = view._buffers.k, view._buffers.v, view._buffers.kv, view._buffers.ort_kv
        view.lengths = self.lengths[start:stop]
        view.adapter_slot = self.adapter_slot[start:stop]
        view.batch, view.capacity = stop - start, self.capacity
        view._parent = self         # its memory is the parent's: not handed on while a view lives
        return view


def _step_feeds(input_ids: np.ndarray, last_slot: np.ndarray, last_rows: np.ndarray) -> dict:
    """The step graph's inputs besides the cache: row b's C tokens go to the slots ending at
    last_slot[b] (GroupQueryAttention's seqlens_k); logits for the flattened (B*C) rows `last_rows`."""
    return {"input_ids": np.ascontiguousarray(input_ids, np.int64), "seqlens_k": last_slot.astype(np.int32),
            "total_sequence_length": np.array(last_slot.max() + 1, np.int32),
            "last_rows": last_rows.astype(np.int64)}


class _AdapterTables:
    """The step graph's run-time adapter inputs (backends/cpu/lean.py): per adapter linear j,
    lora_a_j (R, K, W) and lora_b_j (R, W, N). Each slot's tables live in (slots+1, K, W) /
    (slots+1, W, N) arrays the runtime writes an adapter into (slot 0 stays zero: no
    adapter; zeroed pages are not resident until written). Bound for a batch's rows:
      no row with an adapter  W = 0 tables (the nodes do no arithmetic)
      one adapter for all     R = 1: a view of that slot (no copy)
      rows differ             R = batch: the rows' slots gathered (a copy, held by the
                              call or the cache's step binding until the rows' adapters change)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.slots, self.rank = spec["slots"], spec["rank"]
        self.full, self.empty, self.names = [], [], []
        for lin in spec["linears"]:
            K, N, W = lin["in_features"], lin["out_features"], len(lin["parts"]) * self.rank
            self.names += [lin["a"], lin["b"]]
            self.full += [np.zeros((self.slots + 1, K, W), np.float32), np.zeros((self.slots + 1, W, N), np.float32)]
            self.empty += [np.zeros((1, K, 0), np.float32), np.zeros((1, 0, N), np.float32)]

    def write(self, slot: int, tables: list) -> None:
        """tables: per linear (A (K, W), B (W, N)) as lora.slot_tables gives them; None clears."""
        for j in range(len(self.spec["linears"])):
            a, b = self.full[2 * j], self.full[2 * j + 1]
            if tables is None:
                a[slot], b[slot] = 0.0, 0.0
            else:
                a[slot], b[slot] = tables[j][0].numpy(), tables[j][1].numpy()

    def tables(self, adapter_slot: np.ndarray) -> list[np.ndarray]:
        """The arrays to bind for rows with these slots, in input order (self.names)."""
        first = adapter_slot[0]
        if not adapter_slot.any():
            return self.empty
        if (adapter_slot == first).all():
            return [t[first:first + 1] for t in self.full]
        # held only by the binding that uses it: it goes with that cache (or its next batch)
        return [np.take(t, adapter_slot, axis=0) for t in self.full]

    def feeds(self, adapter_slot: np.ndarray) -> dict:
        return {name: ort.OrtValue.ortvalue_from_numpy(t) for name, t in zip(self.names, self.tables(adapter_slot))}


class _LazySessions(dict):
    """name -> InferenceSession, built by `make(name)` the first time it is asked for."""

    def __init__(self, make, names):
        super().__init__()
        self._make, self._names = make, set(names)

    def __contains__(self, name):
        return name in self._names

    def __missing__(self, name):
        if name not in self._names:
            raise KeyError(name)
        self[name] = session = self._make(name)
        return session


class CpuExecutor:
    def __init__(self, artifact_dir: Path, manifest: dict, threads: int | None = None):
        from glmc.weights import mapped_arrays

        backend = manifest["backend"]
        cfg = manifest["model"]["config"]
        self.n_layers = cfg["num_hidden_layers"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.head_dim = head_dim(cfg)
        self.capacity = manifest["max_seq_len"]
        self.kv_dtype = np.float16 if backend.get("kv_cache") == "fp16" else np.float32
        self.threads = threads or _tuned_threads(artifact_dir) or default_threads()
        # 16-bit linears (or int4 ones on glmc's kernels): TVM kernels between onnxruntime pieces
        # of the step graph (runtime16.py)
        self._linear16 = backend.get("linear16")
        self._split = bool(self._linear16 or backend.get("linearq"))
        # the weights file mapped once (read-only, paged in on use), shared by every session
        self._map, self._weights = mapped_arrays(artifact_dir / backend["weights"], private=self._split)
        self._ort_weights = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in self._weights.items()}
        self._placed: dict[str, np.ndarray] = {}    # weights key -> its copy for glmc's kernels (_kernel_weights)
        self._dir = artifact_dir
        self._backend = backend
        # sessions are created on first use: each holds its own pre-packed copy of the
        # matmul weights. Generation runs on the extend session alone; the full-logits
        # "score" entry is for verification
        self.sessions = _LazySessions(self._make_session, backend["graphs"])
        self._idle: dict[int, _StepBuffers] = {}     # batch size -> a finished step cache's buffers
        self.io = backend["io"]
        self.vocab_size = cfg["vocab_size"]
        # the entry prompts and steps run through: step (lean, in-place cache) or extend
        self.generation = "step" if "step" in backend["graphs"] else "extend"
        if self.generation == "step":
            io = self.io["step"]
            self._past = [x for x in io["inputs"] if x.startswith("past_")]
            self._present = [x for x in io["outputs"] if x.startswith("present_")]
        self.lora = _AdapterTables(backend["lora"]) if backend.get("lora") else None

    def _kernel_weights(self, names: dict) -> dict:
        """{initializer name: array} for glmc kernels' weights (names: initializer name -> weights
        key): copies on 2 MB pages, made once per weight and shared by every entry, where
        huge pages are available and the copies take at most KERNEL_COPY_SHARE of the memory
        available; else the mapped arrays. (A kernel streams its weights from 2 MB pages faster
        than from the file's page-cache pages: see glmc/hugepages.py.)"""
        from glmc.checkpoint import available_memory_bytes

        todo = list(dict.fromkeys(k for k in names.values() if k not in self._placed))
        need = sum(self._weights[k].nbytes for k in todo)
        have = available_memory_bytes()
        if todo and (have is None or need <= KERNEL_COPY_SHARE * have):
            # each weight's mapped pages leave the resident set once copied
            copies = placed([self._weights[k] for k in todo], copied=lambda a: release_pages(self._map, a))
            if copies is not None:
                self._placed.update(zip(todo, copies))
        return {i: self._placed.get(k, self._weights[k]) for i, k in names.items()}

    def _make_session(self, name: str, profile_prefix: str | None = None, model: bytes | None = None,
                      initializers=None, piece: bool = False):
        """A session of entry `name` (or of `model`, a part of it, reading only `initializers`)
        over the mapped weights; for an entry with glmc kernels' linears, its SplitStep (piece:
        `model` is one of a SplitStep's onnxruntime pieces)."""
        if self._split and not piece:   # an entry, or a part of it (verification's layers), with glmc kernels' linears
            from glmc.backends.cpu.runtime16 import GLMC, SplitStep

            part = None if model is None else onnx.load_from_string(model)
            if part is None or any(n.domain == GLMC for n in part.graph.node):
                inits = self._backend["initializers"][name]
                return SplitStep(self._dir / self._backend["graphs"][name] if part is None else part,
                                 lambda sub, names: self._make_session(name, model=sub, initializers=set(names),
                                                                       piece=True),
                                 {i: self._weights[k] for i, k in inits.items()},
                                 self._linear16["dtype"] if self._linear16 else None, self.threads,
                                 # an entry's kernels read copies; verification's layers
                                 # (parts) read the mapping, so its peak stays one layer's
                                 place=None if part is not None else
                                 lambda names: self._kernel_weights({i: inits[i] for i in names}))
        opts = ort.SessionOptions()
        if profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self._split:
            # the pieces take turns with TVM's kernels, whose workers spin between them (without
            # that, waking them costs more than a small-glm linear): onnxruntime's must not spin too
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            # no arena: each piece's would keep its largest call's activations (a 9B model's 160
            # pieces after a 1024-token prompt: ~3.5 GB, which pushed its weights out of memory)
            opts.enable_cpu_mem_arena = False
        for init_name, key in self._backend["initializers"][name].items():
            if initializers is None or init_name in initializers:
                opts.add_initializer(init_name, self._ort_weights[key])
        source = str(self._dir / self._backend["graphs"][name]) if model is None else model
        if model is not None:       # its external-data entries name the artifact's weights file
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self._dir))
        # each session pre-packs its matmul weights into memory of its own; the mapped originals
        # it has read are dropped from the resident set (still in the page cache) while it
        # builds, so the build's peak is the packed copy, not that plus the weights file; once
        # built, its packed copies are moved onto 2 MB pages (glmc/hugepages.py). Not a split
        # step's pieces: their linears' weights are glmc's kernels', read in place, and a piece
        # holds little else
        with _paging_out(self._map), contextlib.nullcontext() if piece else collapsed():
            return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])

    def layered(self, name: str):
        """Entry `name` cut at its layers (backends/cpu/layerwise.py), or None for an artifact
        that does not record where its weights sit."""
        from glmc.backends.cpu.layerwise import LayeredGraph

        depths = self._backend.get("weight_layers")
        if not depths:
            return None
        inits = self._backend["initializers"][name]
        io = self.io[name]
        pairs = dict(zip([x for x in io["inputs"] if x.startswith("past_")],
                         [x for x in io["outputs"] if x.startswith(("new_", "present_"))]))
        return LayeredGraph(
            self._dir / self._backend["graphs"][name], {i: depths[e] for i, e in inits.items() if e in depths},
            lambda model, names: self._make_session(name, model=model, initializers=set(names)),
            lambda batch, dtype: np.zeros((batch, self.kv_heads, self.capacity, self.head_dim), dtype), pairs)

    def _no_adapter(self) -> dict:
        """The step graph's adapter inputs for the base model (W = 0 tables), if it takes any."""
        return dict(zip(self.lora.names, self.lora.empty)) if self.lora else {}

    def _generation_calls(self, ids: np.ndarray, mask: np.ndarray, steps: list[np.ndarray]) -> list:
        """The generation entry's calls for verification, fed as prefill() and decode() feed
        them: the right-padded prompts (ids, mask), then one token per row per entry of `steps`."""
        from glmc.backends.cpu.layerwise import Call

        B, T = ids.shape
        lengths = mask.sum(1)
        real = [np.arange(n) for n in lengths]
        if self.generation == "step":
            none = self._no_adapter()
            calls = [Call({**_step_feeds(ids, np.full(B, T - 1), np.arange(B) * T + lengths - 1), **none},
                          start=0, real=real)]
            for n, tok in enumerate(steps):
                pos = lengths + n
                calls.append(Call({**_step_feeds(tok.reshape(B, 1), pos, np.arange(B)), **none}, position=pos,
                                  real=[np.array([p]) for p in pos]))
            return calls
        calls = [Call({"input_ids": ids, "attention_mask": mask, "position": np.zeros(B, np.int64),
                       "cache_mask": np.zeros((B, 0), np.int64)}, start=0, real=real)]
        slots = np.zeros((B, T + len(steps)), np.int64)
        slots[:, :T] = mask
        used = T
        for n, tok in enumerate(steps):
            pos = lengths + n
            calls.append(Call({"input_ids": tok.reshape(B, 1).astype(np.int64), "attention_mask": np.ones((B, 1), np.int64),
                               "position": pos, "cache_mask": slots[:, :used].copy()},
                              position=pos, real=[np.array([p]) for p in pos]))
            slots[np.arange(B), pos] = 1
            used = max(used, int(pos.max()) + 1)
        return calls

    def by_layer(self, ids: np.ndarray, mask: np.ndarray, steps: list[np.ndarray], reference=None):
        """The verification workload, one depth of the model in memory at a time: every
        position's logits of the right-padded prompts (ids, mask), and the generation path:
        the prompts prefilled, then one token per row per entry of `steps`.

        reference(depth) -> per row, the residual stream into `depth` at positions 0.. of the
        prompt followed by its step tokens; each isolated depth also runs on it.
        Returns None when the artifact cannot be cut, else a dict:
          full (B, T, V), last (B, V), steps [(B, V)]: the artifact's logits;
          stream / local: depth -> {"full": [(n, H) per row], "gen": ...}: the residual stream
            into depth, chained; what depth gives on the reference's stream (the stream
            into the next depth; for the last depth, logits)."""
        from glmc.backends.cpu.layerwise import Call

        B, T = ids.shape
        lengths = mask.sum(1)
        gen = self._generation_calls(ids, mask, steps)
        fill = gen[0]
        score = Call({"input_ids": ids, "attention_mask": mask}, start=0, real=fill.real)
        workloads = [(self.generation, {"gen": gen})]
        if "score" in self.sessions:            # (format 3 step artifacts, declined ones)
            workloads.append(("score", {"full": [score]}))
        elif self.generation == "step":         # every row's logits, over a cache of its own
            workloads[0][1]["full"] = [Call({**_step_feeds(ids, np.full(B, T - 1), np.arange(B * T)),
                                             **self._no_adapter()}, start=0, real=fill.real)]
        else:           # no score entry: the extend entry gives every position at used=0
            workloads[0][1]["full"] = [fill]
        out = {"stream": {}, "local": {}}
        for name, seqs in workloads:
            graph = self.layered(name)
            if graph is None:
                return None
            kinds, calls = list(seqs), list(seqs.values())

            def given(depth, q, c, calls=calls):
                rows = reference(depth)
                x = np.zeros((B, calls[q][c].feeds["input_ids"].shape[1], rows[0].shape[-1]), np.float32)
                for b, at in enumerate(calls[q][c].real):
                    x[b, :len(at)] = rows[b][at]
                return x

            trace = graph.run(calls, given if reference is not None else None)
            per_row = lambda got, q: [np.concatenate([got[q, c][b, :len(call.real[b])] for c, call in  # noqa: E731
                                                      enumerate(calls[q])]) for b in range(B)]
            for q, kind in enumerate(kinds):
                logits = [trace.outputs[q, c]["logits"] for c in range(len(calls[q]))]
                if kind == "full":
                    out["full"] = logits[0].reshape(B, T, -1)       # the step graph's are (B*T, 1, V)
                else:
                    first = logits[0]
                    out["last"] = first[:, 0] if first.shape[1] == 1 else first[np.arange(B), lengths - 1]
                    out["steps"] = [x[:, 0] for x in logits[1:]]
                for depth, got in trace.stream.items():
                    out["stream"].setdefault(depth, {})[kind] = per_row(got, q)
                for depth, got in trace.local.items():
                    out["local"].setdefault(depth, {})[kind] = per_row(got, q)
                if kind == "full" and trace.local_outputs:       # every position's logits
                    local = {(q, c): trace.local_outputs[q, c]["logits"].reshape(B, T, -1)
                             for c in range(len(calls[q]))}
                    out["local"].setdefault(max(graph.depths), {})[kind] = per_row(local, q)
        return out

    def release_scoring(self) -> None:
        """Drop the score session (and its pre-packed weights); rebuilt if asked for again."""
        self.sessions.pop("score", None)

    def profile(self, name: str, prefix: str) -> None:
        """Replace session `name` with one that writes onnxruntime's profile to `prefix`*.json."""
        self.sessions[name] = self._make_session(name, profile_prefix=prefix)

    def new_cache(self, batch: int) -> KVCache | StepCache:
        """A cache for `batch` rows. Step caches: the buffers of the last finished cache of that
        batch size when there is one, with its decode binding and a split step's plan. A plan is
        made on a binding's second decode call, and the first two calls run unplanned (small-glm
        on glmc's kernels: 10-21 ms each against 2.4 ms planned), so without this every request
        paid them. One finished cache's buffers per batch size are kept."""
        if self.generation == "step":
            cache = StepCache(batch, self.n_layers, self.kv_heads, self.capacity, self.head_dim,
                              self._idle.pop(batch, None))
            weakref.finalize(cache, self._idle.__setitem__, batch, cache._buffers)
            return cache
        return KVCache(batch, self.n_layers, self.kv_heads, self.capacity, self.head_dim, self.kv_dtype)

    # ---- the step entry ------------------------------------------------------------------

    def _bind_kv(self, binding, values) -> None:
        """The cache buffers as past_* and present_* at once: written in place."""
        for past, present, value in zip(self._past, self._present, values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def _step_call(self, kv, input_ids: np.ndarray, last_slot: np.ndarray, last_rows: np.ndarray,
                   adapter_slot: np.ndarray) -> np.ndarray:
        """One call of the step graph over cache buffers `kv` (a batch's, or one row's): row b's
        C tokens go to the slots ending at last_slot[b] (with run-time adapter adapter_slot[b])
        -> (B, 1, V) logits of the flattened (B*C) rows `last_rows`."""
        sess = self.sessions["step"]
        binding = sess.io_binding()
        binding.bind_output("logits")
        for name, value in _step_feeds(input_ids, last_slot, last_rows).items():
            binding.bind_cpu_input(name, value)
        if self.lora:
            for name, value in self.lora.feeds(adapter_slot).items():
                binding.bind_ortvalue_input(name, value)
        self._bind_kv(binding, kv)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _step_prefill(self, cache: StepCache, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        B, T = input_ids.shape
        lengths = attention_mask.sum(1)
        # right padding runs as tokens: it sits after its row's last real token, which (causal)
        # never sees it, and the slots it fills are rewritten by the row's next tokens
        logits = self._step_call(cache.ort_kv, input_ids, np.full(B, T - 1), np.arange(B) * T + lengths - 1,
                                 cache.adapter_slot)
        cache.lengths[:] = lengths
        return logits[:, 0]

    def _step_extend(self, cache: StepCache, input_ids: np.ndarray, attention_mask: np.ndarray,
                     start: int) -> np.ndarray:
        B, C = input_ids.shape
        real = attention_mask.sum(1)
        logits = np.zeros((B, 1, self.vocab_size), np.float32)
        for b in np.nonzero(real)[0]:
            # GroupQueryAttention takes a chunk after a cache one row at a time: row b's views
            rows = [ort.OrtValue.ortvalue_from_numpy(a[b:b + 1]) for a in cache.kv]
            logits[b] = self._step_call(rows, input_ids[b:b + 1], np.array([start + C - 1]), np.array([real[b] - 1]),
                                        cache.adapter_slot[b:b + 1])[0]
            cache.lengths[b] = start + real[b]
        return logits

    def _step_decode(self, cache: StepCache, input_ids: np.ndarray, position: np.ndarray) -> np.ndarray:
        """Bound once per cache: a step writes ids and slots into the arrays the binding reads
        and runs. The logits are the bound buffer, valid until the next step."""
        sess = self.sessions["step"]
        if cache.step is None or cache.step[0] is not sess:
            B = cache.batch
            ids, slot, total = np.zeros((B, 1), np.int64), np.zeros(B, np.int32), np.zeros((), np.int32)
            logits = np.empty((B, 1, self.vocab_size), np.float32)
            binding = sess.io_binding()
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (ids, slot, total, np.arange(B, dtype=np.int64))]
            for name, value in zip(("input_ids", "seqlens_k", "total_sequence_length", "last_rows"), values):
                binding.bind_ortvalue_input(name, value)
            out = ort.OrtValue.ortvalue_from_numpy(logits)
            binding.bind_ortvalue_output("logits", out)
            self._bind_kv(binding, cache.ort_kv)
            cache.step = [sess, binding, ids, slot, total, logits, values, out, None, None]
        _, binding, ids, slot, total, logits = cache.step[:6]
        if self.lora:       # the rows' adapter tables, bound again when the rows' adapters change
            key = cache.adapter_slot.tobytes()
            if cache.step[8] != key:
                feeds = self.lora.feeds(cache.adapter_slot)
                for name, value in feeds.items():
                    binding.bind_ortvalue_input(name, value)
                cache.step[8:] = [key, feeds]
        ids[:] = input_ids
        slot[:] = position
        total[...] = slot.max() + 1
        sess.run_with_iobinding(binding)
        np.maximum(cache.lengths, position + 1, out=cache.lengths)
        return logits

    def _extend(self, cache: KVCache, input_ids: np.ndarray, attention_mask: np.ndarray,
                position: np.ndarray, used: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the extend graph: (B, C) tokens at per-row positions `position`.. after
        the first `used` cache slots (the only ones the graph reads) -> (logits, new K/V).

        The logits are (B, 1, V) for each row's last real token when last_token_logits
        rewrote the graph, else (B, C, V)."""
        B, C = input_ids.shape
        sess = self.sessions["extend"]
        binding = sess.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_cpu_input("position", position)
        binding.bind_cpu_input("cache_mask", np.ascontiguousarray(cache.mask[:, :used]))
        for name, value in zip(self.io["extend"]["inputs"][4:], cache.ort_past):
            binding.bind_ortvalue_input(name, value)
        new = [np.empty((B, self.kv_heads, C, self.head_dim), np.float32) for _ in range(2 * self.n_layers)]
        binding.bind_output("logits")
        for name, arr in zip(self.io["extend"]["outputs"][1:], new):
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(arr))
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy(), new

    def prefill(self, cache, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, T) right-padded ids and mask -> (B, V) logits of each row's last real token;
        fills cache slots [0, T)."""
        if self.generation == "step":
            return self._step_prefill(cache, input_ids, attention_mask)
        logits = self._fill(cache, input_ids, attention_mask, 0)
        if logits.shape[1] == 1:
            return logits[:, 0]
        return logits[np.arange(len(logits)), attention_mask.sum(1) - 1]

    def extend(self, cache, input_ids: np.ndarray, attention_mask: np.ndarray, start: int) -> np.ndarray:
        """(B, C) more prompt tokens at positions start.. -> logits; fills slots [start, start+C)."""
        if self.generation == "step":
            return self._step_extend(cache, input_ids, attention_mask, start)
        return self._fill(cache, input_ids, attention_mask, start)

    def _fill(self, cache: KVCache, input_ids: np.ndarray, attention_mask: np.ndarray, start: int) -> np.ndarray:
        B, C = input_ids.shape
        logits, new = self._extend(cache, input_ids, attention_mask, np.full(B, start, np.int64), start)
        cache.store(new, start, attention_mask)
        cache.used = max(cache.used, start + C)
        return logits

    def decode(self, cache, input_ids: np.ndarray, position: np.ndarray) -> np.ndarray:
        """(B, 1) ids at (B,) positions -> (B, 1, V) logits; writes slot `position`. The step
        entry returns its bound output buffer: valid until the next step (copy to keep it)."""
        if self.generation == "step":
            return self._step_decode(cache, input_ids, position)
        B = cache.batch
        logits, new = self._extend(cache, input_ids, np.ones((B, 1), np.int64), position, cache.used)
        cache.store_step(new, np.arange(B), position)
        cache.used = max(cache.used, int(position.max()) + 1)
        return logits

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, T) -> (B, T, V) logits for every position (no cache)."""
        if "score" in self.sessions:        # (format 3 step artifacts, declined ones)
            return self.sessions["score"].run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        if self.generation == "step":       # all B*T rows' logits, over a cache just big enough
            B, T = input_ids.shape
            cache = StepCache(B, self.n_layers, self.kv_heads, T, self.head_dim)
            return self._step_call(cache.ort_kv, input_ids, np.full(B, T - 1), np.arange(B * T),
                                   cache.adapter_slot).reshape(B, T, -1)
        # no score entry: last_token_logits did not run, so extend returns every position
        return self._extend(self.new_cache(len(input_ids)), input_ids, attention_mask,
                            np.zeros(len(input_ids), np.int64), 0)[0]
