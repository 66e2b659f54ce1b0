"""A CPU artifact's entry graph cut at its layers and run one layer at a time.

Verification compares an artifact with transformers without either model whole in
memory: the reference runs one decoder layer at a time (glmc/verify.py), and so does
the artifact, here. The graph is cut by where its weights sit in depth (the manifest's
backend.weight_layers: the embedding table -1, decoder layer i, the final norm and
lm_head n_layers). A node belongs to the depth of the deepest weight it depends on;
a node that depends on no weight (masks, positions, the KV cache's slices) belongs to
the first depth that uses it. Each depth's nodes, unchanged, make one graph
(a "segment"), and the segments run in order, each built, run on every call of the
workload (a prompt, then decode steps, with its own layer's KV cache) and dropped
before the next is built: one layer's weights (and their pre-packed copy) in memory.

Where the residual stream enters each depth is known too: the RMSNorm that feeds the
depth's first matmul (a SkipSimplifiedLayerNormalization sums its two inputs first).
That gives the hidden state between layers, and lets a depth be run on transformers'
hidden state instead of the previous segment's: each layer checked on its own input,
so quantization noise is measured per layer, not compounded over depth.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from glmc.errors import GlmcError

NORMS = ("RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
# ops a normed hidden state may pass through on its way to a matmul (the last token's row, a view)
_VIEWS = ("Gather", "GatherElements", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast")


@dataclass
class Call:
    """One run of the entry: its graph inputs except the KV cache, and which slots its new
    K/V go to: [start, start + C) for a prompt, or one slot per row (`position`) for a step."""

    feeds: dict
    start: int | None = None
    position: np.ndarray | None = None
    real: list | None = None        # per row, the positions of its real (not padding) tokens


@dataclass
class Segment:
    depth: int
    nodes: list
    inputs: list                    # read from the graph's inputs or earlier segments
    outputs: list                   # needed by later segments or the graph's outputs
    initializers: list
    tap: tuple | None = None        # the residual stream into this depth: (x,) or (input, skip), summed
    shape_only: tuple = ()          # KV-cache inputs of other depths it reads only the shape of
    isolated: bool = False          # every weight-derived input is the tap: it can run on another stream


@dataclass
class Trace:
    """What running the segments gave, per sequence of calls q and call c."""

    outputs: dict = field(default_factory=dict)    # (q, c) -> {graph output name: value}
    stream: dict = field(default_factory=dict)     # depth d -> {(q, c): stream into d, chained}
    local: dict = field(default_factory=dict)      # depth d -> {(q, c): what d gives on the given stream}
    local_outputs: dict = field(default_factory=dict)   # (q, c) -> graph outputs of the last depth on the given stream


class LayeredGraph:
    """One entry graph (an .onnx file of the artifact) as consecutive depth segments.

    make_session(model_bytes, initializer names) -> an onnxruntime session with the
    artifact's mapped weights for those names; cache_buffer(batch, dtype) -> a zeroed
    (B, Hkv, S, D) KV buffer; kv_pairs: past_* input -> new_* output."""

    def __init__(self, path: Path, weight_depth: dict[str, int], make_session, cache_buffer,
                 kv_pairs: dict[str, str]):
        self.model = onnx.load(str(path), load_external_data=False)
        self.make_session, self.cache_buffer, self.kv_pairs = make_session, cache_buffer, kv_pairs
        graph = self.model.graph
        self._graph_inputs = {v.name: v for v in graph.input}
        self._graph_outputs = [v.name for v in graph.output]
        self._value_info = {v.name: v for v in [*graph.value_info, *graph.output]}
        self._inits = {t.name: t for t in graph.initializer}
        self.segments = self._cut(list(graph.node), weight_depth)

    # ------------------------------------------------------------------ cutting
    def _cut(self, nodes: list, weight_depth: dict[str, int]) -> list[Segment]:
        producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
        consumers = defaultdict(list)
        for i, n in enumerate(nodes):
            for x in n.input:
                if x in producer:
                    consumers[x].append(i)
        seed = [max((weight_depth[x] for x in n.input if x in weight_depth), default=None) for n in nodes]
        norm_at = self._stream_norms(nodes, seed, producer, self._inits)
        for depth, j in norm_at.items():
            seed[j] = depth if seed[j] is None else seed[j]
        depth_of: list = [None] * len(nodes)
        weighted = [False] * len(nodes)
        for i, n in enumerate(nodes):           # ASAP: a weight's consumers sit at its depth or deeper
            from_weights = [depth_of[producer[x]] for x in n.input if x in producer and weighted[producer[x]]]
            if seed[i] is not None or from_weights:
                weighted[i] = True
                depth_of[i] = max(from_weights + ([seed[i]] if seed[i] is not None else []))
        for i in reversed(range(len(nodes))):   # ALAP: the rest where first used
            if not weighted[i]:
                used_at = [depth_of[c] for out in nodes[i].output for c in consumers.get(out, [])]
                depth_of[i] = min(used_at) if used_at else -1
        graph_outputs = set(self._graph_outputs)
        last_use = defaultdict(lambda: -2)
        for i, n in enumerate(nodes):
            for x in n.input:
                last_use[x] = max(last_use[x], depth_of[i])
        self.last_use = dict(last_use)
        segments = []
        for depth in sorted(set(depth_of)):
            idx = [i for i in range(len(nodes)) if depth_of[i] == depth]
            made = {out for i in idx for out in nodes[i].output if out}
            read = list(dict.fromkeys(x for i in idx for x in nodes[i].input if x and x not in made))
            inputs = [x for x in read if x not in self._inits]
            outputs = [x for x in sorted(made) if x in graph_outputs or last_use.get(x, -2) > depth]
            seg = Segment(depth, [nodes[i] for i in idx], inputs, outputs, [x for x in read if x in self._inits])
            j = norm_at.get(depth)
            if j is not None and depth_of[j] == depth:
                norm = nodes[j]
                tap = tuple(norm.input[:2] if norm.op_type == "SkipSimplifiedLayerNormalization" else norm.input[:1])
                if all(x in inputs for x in tap):
                    seg.tap = tap
                    seg.isolated = all(x in tap or not (x in producer and weighted[producer[x]]) for x in inputs)
            segments.append(seg)
        for seg in segments:
            # another depth's cache may be read for its shape (the batch size): any buffer of that shape does
            foreign = [x for x in seg.inputs if x in self.kv_pairs and self.kv_pairs[x] not in seg.outputs]
            if any(n.op_type != "Shape" for n in seg.nodes for x in foreign if x in n.input):
                raise GlmcError("cannot run the graph layer by layer: a layer reads a KV cache another one writes")
            seg.shape_only = tuple(foreign)
        return segments

    @staticmethod
    def _stream_norms(nodes, seed, producer, inits) -> dict[int, int]:
        """depth -> index of the norm that carries the residual stream into it: the norm
        feeding the depth's first weighted node (or that node, when it is the norm).

        A node computed from initializers alone (a reshape of scales; the int8 codes turned
        into DynamicQuantizeMatMul's layout, which onnxruntime folds when the session is
        built) is not on the stream's path; it hands its weight's depth to its consumers."""
        folded, depth_via = [False] * len(nodes), list(seed)
        for i, n in enumerate(nodes):
            ins = [x for x in n.input if x]
            folded[i] = all(x in inits or (x in producer and folded[producer[x]]) for x in ins)
            via = [depth_via[producer[x]] for x in ins if x in producer and folded[producer[x]]]
            via = [d for d in via if d is not None] + ([seed[i]] if seed[i] is not None else [])
            depth_via[i] = max(via) if via else None
        found = {}
        for i, depth in enumerate(depth_via):
            if depth is None or depth < 0 or depth in found or folded[i]:
                continue
            if not any(x in producer and not folded[producer[x]] for x in nodes[i].input):
                continue
            j, hops = i, 0
            while nodes[j].op_type not in NORMS and hops < 4:
                src = producer.get(nodes[j].input[0]) if nodes[j].input else None
                if src is None or nodes[src].op_type not in NORMS + _VIEWS:
                    break
                j, hops = src, hops + 1
            found[depth] = j if nodes[j].op_type in NORMS else None
        return {d: j for d, j in found.items() if j is not None}

    @property
    def depths(self) -> list[int]:
        return [s.depth for s in self.segments]

    # ------------------------------------------------------------------ running
    def _session(self, seg: Segment, feeds: dict):
        def info(name):
            if name in self._graph_inputs:
                return self._graph_inputs[name]
            if name in self._value_info and self._value_info[name].type.tensor_type.elem_type:
                return self._value_info[name]
            return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(feeds[name].dtype), None)

        made = {out for n in seg.nodes for out in n.output}
        graph = helper.make_graph(
            seg.nodes, f"depth_{seg.depth}", [info(x) for x in seg.inputs],
            [self._value_info.get(x) or onnx.ValueInfoProto(name=x) for x in seg.outputs],
            initializer=[self._inits[x] for x in seg.initializers],
            value_info=[v for n, v in self._value_info.items() if n in made and n not in seg.outputs])
        model = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        return self.make_session(model.SerializeToString(), seg.initializers)

    def run(self, sequences: list[list[Call]], stream_in=None) -> Trace:
        """Run every call of every sequence, one segment at a time. stream_in(depth, q, c) ->
        the residual stream (B, C, H) to also run an isolated depth on (its own KV cache)."""
        trace = Trace()
        values = {(q, c): {} for q, calls in enumerate(sequences) for c in range(len(calls))}
        for seg in self.segments:
            first = sequences[0][0]
            sess = self._session(seg, {**first.feeds, **values[0, 0]})
            if seg.tap:
                trace.stream[seg.depth] = {k: _sum(v, seg.tap) for k, v in values.items()}
            modes = ["chained"] + (["local"] if stream_in is not None and seg.isolated else [])
            nxt = self._next_tap(seg)
            for mode in modes:
                for q, calls in enumerate(sequences):
                    cache, shapes = {}, {}      # this depth's KV cache; other depths' (read for their shape)
                    for c, call in enumerate(calls):
                        feeds = {}
                        for x in seg.inputs:
                            if x in self.kv_pairs:
                                held = shapes if x in seg.shape_only else cache
                                if x not in held:
                                    held[x] = self.cache_buffer(len(call.feeds["input_ids"]),
                                                                _dtype(self._graph_inputs[x]))
                                feeds[x] = held[x]
                            else:
                                feeds[x] = call.feeds[x] if x in call.feeds else values[q, c][x]
                        if mode == "local":
                            given = stream_in(seg.depth, q, c)
                            feeds[seg.tap[0]] = given.astype(feeds[seg.tap[0]].dtype)
                            for x in seg.tap[1:]:
                                feeds[x] = np.zeros_like(feeds[x])
                        out = dict(zip(seg.outputs, sess.run(seg.outputs, feeds)))
                        self._store(cache, out, call)
                        graph_out = {x: out[x] for x in self._graph_outputs
                                     if x in out and x not in self.kv_pairs.values()}
                        if mode == "chained":
                            values[q, c].update(out)
                            trace.outputs.setdefault((q, c), {}).update(graph_out)
                        else:
                            if nxt and all(x in out for x in nxt):
                                trace.local.setdefault(seg.depth, {})[q, c] = _sum(out, nxt)
                            if "logits" in graph_out:
                                trace.local_outputs.setdefault((q, c), {}).update(graph_out)
            del sess
            for v in values.values():       # what no later segment reads
                for x in [x for x in v if self.last_use.get(x, -2) <= seg.depth]:
                    del v[x]
        return trace

    def _next_tap(self, seg: Segment):
        later = [s for s in self.segments if s.depth > seg.depth]
        return later[0].tap if later else None

    def _store(self, cache: dict, out: dict, call: Call) -> None:
        """The call's new K/V into their slots, as the runtime's KVCache stores them (a graph
        whose attention writes the whole buffer, the step entry, gives it back whole)."""
        for past, buf in cache.items():
            new = out[self.kv_pairs[past]]
            if new.shape == buf.shape:
                buf[...] = new
            elif call.position is None:
                buf[:, :, call.start:call.start + new.shape[2]] = new
            else:
                buf[np.arange(buf.shape[0]), :, call.position] = new[:, :, 0]


def _sum(values: dict, names: tuple) -> np.ndarray:
    out = values[names[0]]
    for x in names[1:]:
        out = out + values[x]
    return out


def _dtype(info: onnx.ValueInfoProto):
    return helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
