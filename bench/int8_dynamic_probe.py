"""A probe, not a glmc feature: what a dynamic-int8 CPU artifact would run at, before building it.

    python bench/int8_dynamic_probe.py [--model small-glm] [--rounds 3]
                                       [--out bench/results/int8-dynamic-probe.json]

Compiles MODEL at int4 (g128) and int8 (g128), unverified, then copies the int8 artifact and
rewrites its step graph: every MatMulNBits (bits 8) becomes a com.microsoft.DynamicQuantizeMatMul
over the same codes laid out (K, N) with one scale per output column (glmc's int8 is per
column already: requantizing the dequantized weight gives its codes back; inline
initializers, the manifest's hashes rewritten). bench/int8_forms_quality.py measures
what that arithmetic costs in quality on the trained fixture; this measures speed, through
glmc's own runtime:

  decode step   ms at 1 row and at 16 rows (rows prefilled with 32 tokens), median of 40
                steps after 5, and the 16-row step against 16 one-row steps (own form, and
                the int4 artifact's: what `glmc serve` with 16 clients gains over sequential)
  prefill       128 tokens in one call, tokens/s, median of 5

`--rounds` alternates the three artifacts; reported as min / median / max over rounds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)

PROMPT = list(range(5, 37))


def rewrite_dynamic(src: Path, dst: Path) -> int:
    """dst: a copy of int8 artifact src whose step graph runs DynamicQuantizeMatMul; how many nodes."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from glmc.artifact import write_manifest
    from glmc.weights import mapped_arrays

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    inits = manifest["backend"]["initializers"]["step"]
    _, arrays = mapped_arrays(dst / manifest["backend"]["weights"])
    model = onnx.load(str(dst / "step.onnx"), load_external_data=False)
    graph = model.graph
    produced = {out: node for node in graph.node for out in node.output}

    def stored(name):           # the weights-file entry behind a value (through a Reshape of scales)
        while name not in inits:
            name = produced[name].input[0]
        return arrays[inits[name]]

    nodes, added, count = [], [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs.get("bits") != 8:
            nodes.append(node)
            continue
        K, N, block = attrs["K"], attrs["N"], attrs["block_size"]
        q = np.asarray(stored(node.input[1]), np.float32).reshape(N, -1, block)
        scale = np.asarray(stored(node.input[2]), np.float32).reshape(N, -1, 1)
        w = ((q - 128) * scale).reshape(N, -1)[:, :K]           # MatMulNBits' 8-bit zero point is 128
        col = np.maximum(np.abs(w).max(1), 1e-12) / 127
        wq = np.clip(np.round(w / col[:, None]), -127, 127).astype(np.int8).T.copy()
        names = (f"{node.input[1]}_col", f"{node.input[2]}_col")
        added += [numpy_helper.from_array(wq, names[0]), numpy_helper.from_array(col.astype(np.float32), names[1])]
        bias = [node.input[5]] if len(node.input) > 5 and node.input[5] else []
        nodes.append(helper.make_node("DynamicQuantizeMatMul", [node.input[0], *names, *([""] + bias if bias else [])],
                                      list(node.output), domain="com.microsoft"))
        inits.pop(node.input[1], None)
        count += 1
    used = {x for node in nodes for x in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    onnx.save_model(model, str(dst / "step.onnx"))
    write_manifest(dst, manifest)
    return count


def _time(path: Path) -> dict:
    import numpy as np

    import glmc

    ex = glmc.load(path).executor
    out = {"threads": ex.threads}
    for rows in (1, 16):
        cache = ex.new_cache(rows)
        ids = np.array([PROMPT] * rows)
        ex.prefill(cache, ids, np.ones_like(ids))
        pos, tok = np.full(rows, len(PROMPT)), np.full((rows, 1), 7)
        times = []
        for n in range(45):
            t0 = time.perf_counter()
            ex.decode(cache, tok, pos)
            if n >= 5:
                times.append(time.perf_counter() - t0)
            pos += 1
        out[f"step_ms_{rows}"] = float(np.median(times)) * 1e3
    long = np.arange(5, 133)[None]
    times = []
    for _ in range(5):
        cache = ex.new_cache(1)
        t0 = time.perf_counter()
        ex.prefill(cache, long, np.ones_like(long))
        times.append(time.perf_counter() - t0)
    out["prefill_128_tokens_per_s"] = 128 / float(np.median(times))
    return out


def main(argv=None) -> int:
    import onnxruntime

    import glmc
    from glmc.measure import cpu_name, summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-glm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        arts = {q: glmc.compile(args.model, work / f"{q}.glmc", quant=q, verify=False, max_seq_len=256)
                for q in ("int4", "int8")}
        rewritten = rewrite_dynamic(arts["int8"], work / "int8-dynamic.glmc")
        arts["int8-dynamic"] = work / "int8-dynamic.glmc"
        rounds = {name: [] for name in arts}
        for _ in range(args.rounds):
            for name, path in arts.items():
                rounds[name].append(_time(path))
    int4_one = [r["step_ms_1"] for r in rounds["int4"]]
    results = {}
    for name, rs in rounds.items():
        results[name] = {
            "decode_step_ms_1_row": summarize([r["step_ms_1"] for r in rs]),
            "decode_step_ms_16_rows": summarize([r["step_ms_16"] for r in rs]),
            "16_rows_vs_16_own_steps": summarize([16 * r["step_ms_1"] / r["step_ms_16"] for r in rs]),
            "16_rows_vs_16_int4_steps": summarize([16 * i / r["step_ms_16"] for r, i in zip(rs, int4_one)]),
            "prefill_128_tokens_per_s": summarize([r["prefill_128_tokens_per_s"] for r in rs]),
        }
    emit({"what": "decode and prefill of int4, int8 and a DynamicQuantizeMatMul rewrite of the int8 artifact",
          "model": args.model, "rewritten_nodes": rewritten, "rounds": args.rounds,
          "machine": {"cpu": cpu_name(), "threads": rounds["int4"][0]["threads"]},
          "versions": {"onnxruntime": onnxruntime.__version__}, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
