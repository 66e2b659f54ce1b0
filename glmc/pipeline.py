"""The one ordered list of passes glmc runs, and the pass manager that runs it.

Reading PIPELINE tells you everything the compiler does to a graph:

  canonicalize  drop what only the trace needed (no-op casts, dropout, checks)
  fuse          rotary, attention (fp32 softmax, GQA, KV cache), qkv, add+rmsnorm,
                swiglu / gelu MLP, last-token logits: each into a glmc:: op (glmc/ops/)
  quantize      int8 per-channel / int4 group-wise weights (glmc/quant.py), AWQ-style
                scales when calibrating
  cleanup       dead code left behind by the rewrites
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch.fx import GraphModule

from glmc.errors import GlmcError
from glmc.ir import PassContext, PassResult, histogram, node_count
from glmc.passes.eliminate_dead_code import eliminate_dead_code
from glmc.passes.fold_noops import fold_noops
from glmc.passes.fuse_add_rmsnorm import fuse_add_rmsnorm
from glmc.passes.fuse_attention import fuse_attention
from glmc.passes.fuse_gelu_mlp import fuse_gelu_mlp
from glmc.passes.fuse_qkv import fuse_qkv
from glmc.passes.fuse_rotary import fuse_rotary
from glmc.passes.fuse_swiglu import fuse_swiglu
from glmc.passes.last_token_logits import last_token_logits
from glmc.passes.quantize_weights import quantize_weights

Pass = Callable[[GraphModule, PassContext], PassResult]

# (phase, name, pass). Order matters: rotary is matched before attention rewrites
# its consumers; qkv after both, since it only sees the three linears.
PIPELINE: list[tuple[str, str, Pass]] = [
    ("canonicalize", "fold_noops", fold_noops),
    ("fuse", "fuse_rotary", fuse_rotary),
    ("fuse", "fuse_attention", fuse_attention),
    ("fuse", "fuse_qkv", fuse_qkv),
    ("fuse", "fuse_add_rmsnorm", fuse_add_rmsnorm),
    ("fuse", "fuse_swiglu", fuse_swiglu),
    ("fuse", "fuse_gelu_mlp", fuse_gelu_mlp),
    ("fuse", "last_token_logits", last_token_logits),
    ("quantize", "quantize_weights", quantize_weights),
    ("cleanup", "eliminate_dead_code", eliminate_dead_code),
]


def pipeline(ctx: PassContext) -> list[tuple[str, Pass]]:
    """The passes to run for this compile: all of PIPELINE, less `fuse` under --no-fuse,
    up to (not including) the phase named by `stop_before`."""
    out = []
    for phase, name, fn in PIPELINE:
        if phase == ctx.stop_before:
            break
        if ctx.fuse or phase != "fuse":
            out.append((name, fn))
    return out


@dataclass
class PassRecord:
    graph: str
    name: str
    matches: int
    nodes_before: int
    nodes_after: int
    ms: float
    hist_before: dict
    hist_after: dict
    report: dict = field(default_factory=dict)     # what the pass reported (PassResult.report)

    def as_dict(self, with_histograms: bool = False) -> dict:
        d = asdict(self)
        d.pop("report")
        if not with_histograms:
            d.pop("hist_before")
            d.pop("hist_after")
        return d


def run_pipeline(
    gm: GraphModule,
    ctx: PassContext,
    graph_name: str,
    passes: list[tuple[str, Pass]] | None = None,
    check: bool = True,
) -> tuple[GraphModule, list[PassRecord]]:
    """Run each pass in order; lint the graph after each one when `check`."""
    records: list[PassRecord] = []
    done: list[str] = []
    for name, fn in pipeline(ctx) if passes is None else passes:
        before = histogram(gm)
        n_before = node_count(gm)
        t0 = time.perf_counter()
        try:
            result = fn(gm, ctx)
            gm = result.gm
            if check:
                gm.graph.lint()
        except GlmcError:
            raise
        except Exception as e:  # a pass bug: say which pass and what ran before it
            raise RuntimeError(f"pass {name} failed on the {graph_name} graph after {done}: {e}") from e
        ms = (time.perf_counter() - t0) * 1e3
        records.append(PassRecord(graph_name, name, result.matches, n_before, node_count(gm), round(ms, 2),
                                  dict(before), dict(histogram(gm)), result.report))
        done.append(name)
    return gm, records
