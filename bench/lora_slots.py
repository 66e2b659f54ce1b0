"""What run-time adapter slots cost: decode and prefill with and without --lora-slots.

    python bench/lora_slots.py [--preset small-glm] [--quant int4] [--slots 4] [--rank 16]
                               [--rounds 5] [--steps 64] [--pairs 60] [--out bench/results/lora-slots-small-glm-int4.json]

The preset is written out as a checkpoint and a PEFT adapter (random A, B scaled to a
realistic delta; rank R on q/k/v/o and the MLP) is made for it. Three artifacts are
compiled at --quant: without slots ("plain"), with --lora-slots/--lora-rank ("slots"),
and with the adapter merged ("merged"). Before timing:
  - slots with no adapter must give plain's greedy tokens (else the run stops);
  - slots with the adapter is compared with merged: greedy tokens and logits. At int4 they
    differ by design: merged quantizes W + BA, slots quantize W and add BA in fp32.
  - all three against PEFT's merge_and_unload in fp32 (torch): mean |logits difference|.
Then, interleaved over --rounds, batch 1: decode step time at a 32-token context (median of
--steps steps) and a 128-token prefill (median of 3), for plain, slots without an adapter and slots with
one. Each case runs in a process of its own (this script with --time), so no other
session's onnxruntime threads share the cores. Ratios are per round (slots / plain),
reported min/median/max. On a noisy host the rounds spread wide, so the no-adapter cost is
also measured paired (--pairs): plain and slots loaded in one process, blocks of 25 steps
alternating, one ratio per pair of neighbouring blocks.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)


def _adapter(preset: str, rank: int, path: Path) -> list[str]:
    import peft
    import torch

    from glmc.checkpoint import load

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    pm = peft.get_peft_model(load(preset).model, cfg)
    with torch.no_grad():       # PEFT's random init is large for a 1024-wide model: scale B down
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    pm.save_pretrained(path)
    return targets


def _time(argv) -> int:
    """--time ARTIFACT [ADAPTER]: one case's prefill and decode step, as JSON on stdout."""
    import json

    import numpy as np

    import glmc

    ap = argparse.ArgumentParser()
    ap.add_argument("--time", type=Path, required=True)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--context", type=int)
    ap.add_argument("--prefill", type=int)
    args = ap.parse_args(argv)
    rt = glmc.load(args.time)
    slots = None
    if args.adapter:
        rt.add_adapter("a", args.adapter)
        slots = rt._adapter_slots("a", 1)
    prompt, long = list(range(5, 5 + args.context)), list(range(5, 5 + args.prefill))
    rt.prefill([long], slots)                          # warm-up
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        rt.prefill([long], slots)
        runs.append((time.perf_counter() - t0) * 1e3)
    prefill_ms = float(np.median(runs))
    cache, last = rt.prefill([prompt], slots)
    state = [cache, np.array([args.context]), int(last[0].argmax())]
    _greedy_steps(rt, state, 16, args.context)          # warm-up
    times = _greedy_steps(rt, state, args.steps, args.context)
    print(json.dumps({"prefill_ms": prefill_ms, "step_ms": float(np.median(times)) * 1e3}))
    return 0


def _greedy_steps(rt, state: list, n: int, context: int) -> list[float]:
    """n greedy decode steps of batch 1 from state = [cache, position (1,), last token],
    updated in place; the seconds of each. Past the capacity the cache's slots are reused
    from `context` on."""
    import numpy as np

    cache, pos, tok = state
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        tok = int(rt.executor.decode(cache, np.array([[tok]]), pos)[0, 0].argmax())
        times.append(time.perf_counter() - t0)
        pos += 1
        if pos[0] >= rt.max_seq_len - 1:
            pos[:] = context
    state[2] = tok
    return times


def _paired(arts: dict, pairs: int, steps: int, context: int) -> list[float]:
    """Slots without an adapter against plain in one process: blocks of `steps` decode steps,
    alternating which goes first, a pause between blocks so the idle session's threads park.
    One ratio (slots / plain, block medians) per pair: both sides of a ratio ran within
    milliseconds of each other, so a host's drift cancels."""
    import numpy as np

    import glmc

    rts, state = {}, {}
    for name in ("plain", "slots"):
        rts[name] = glmc.load(arts[name])
        cache, last = rts[name].prefill([list(range(5, 5 + context))])
        state[name] = [cache, np.array([context]), int(last[0].argmax())]

    def block(name: str, n: int) -> float:
        return float(np.median(_greedy_steps(rts[name], state[name], n, context)))

    block("plain", steps)
    block("slots", steps)                           # warm-up
    out = []
    for i in range(pairs):
        got = {}
        for name in (("plain", "slots") if i % 2 == 0 else ("slots", "plain")):
            time.sleep(0.02)
            got[name] = block(name, steps)
        out.append(got["slots"] / got["plain"])
    return out


def main(argv=None) -> int:
    import json
    import subprocess

    import numpy as np
    import onnxruntime
    import peft
    import torch

    argv = sys.argv[1:] if argv is None else argv
    if "--time" in argv:
        return _time(argv)

    import glmc
    from glmc.checkpoint import load
    from glmc.measure import cpu_name, summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-glm")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=60,
                    help="paired in-process blocks of 25 decode steps (no adapter vs plain)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="glmc-lora-slots-"))
    load(args.preset).model.save_pretrained(work / "base")
    targets = _adapter(args.preset, args.rank, work / "lora")
    common = dict(quant=args.quant, progress=False, verify=False)
    arts = {"plain": glmc.compile(work / "base", work / "plain.glmc", **common),
            "slots": glmc.compile(work / "base", work / "slots.glmc", lora_slots=args.slots, lora_rank=args.rank,
                                  **common),
            "merged": glmc.compile(work / "base", work / "merged.glmc", lora=[work / "lora"], **common)}
    rts = {k: glmc.load(v) for k, v in arts.items()}
    rts["slots"].add_adapter("a", work / "lora")
    slot_a = rts["slots"]._adapter_slots("a", 1)

    # correctness first
    prompt = list(range(5, 5 + args.context))
    plain_tokens = rts["plain"].generate(prompt, max_new_tokens=32)
    if rts["slots"].generate(prompt, max_new_tokens=32) != plain_tokens:
        raise SystemExit("slots without an adapter do not give the plain artifact's tokens")
    with_a = rts["slots"].generate(prompt, max_new_tokens=32, adapter="a")[0]
    merged_tokens = rts["merged"].generate(prompt, max_new_tokens=32)[0]
    agree = next((i for i, (x, y) in enumerate(zip(with_a, merged_tokens)) if x != y), len(with_a))
    _, got = rts["slots"].prefill([prompt], slot_a)
    _, merged_int = rts["merged"].prefill([prompt])
    _, base = rts["plain"].prefill([prompt])
    fp32 = peft.PeftModel.from_pretrained(load(args.preset).model, work / "lora").merge_and_unload()
    with torch.no_grad():
        want = fp32(input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
    del rts, fp32

    cases = {"plain": [arts["plain"]], "slots_no_adapter": [arts["slots"]],
             "slots_with_adapter": [arts["slots"], "--adapter", work / "lora"]}
    step_ms: dict[str, list[float]] = {k: [] for k in cases}
    prefill_ms: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, case in cases.items():
            out = subprocess.run([sys.executable, __file__, "--time", *map(str, case), "--steps", str(args.steps),
                                  "--context", str(args.context), "--prefill", str(args.prefill)],
                                 check=True, capture_output=True, text=True).stdout
            got_times = json.loads(out.strip().splitlines()[-1])
            step_ms[name].append(got_times["step_ms"])
            prefill_ms[name].append(got_times["prefill_ms"])
    paired = _paired(arts, args.pairs, 25, args.context)

    def ratios(d, name):
        return summarize([x / y for x, y in zip(d[name], d["plain"])])

    manifest = json.loads((arts["slots"] / "manifest.json").read_text())
    cfg = manifest["model"]["config"]
    report = {
        "what": "run-time adapter slots: decode step and prefill, batch 1, with and without --lora-slots",
        "machine": {"cpu": cpu_name(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "glmc": glmc.__version__},
        "preset": args.preset, "quant": args.quant, "slots": args.slots, "rank": args.rank, "targets": targets,
        "adapter_linears": len(manifest["backend"]["lora"]["linears"]),
        "layers": cfg["num_hidden_layers"],
        "context": args.context, "steps_per_round": args.steps, "rounds": args.rounds, "prefill_tokens": args.prefill,
        "decode_step_ms": {k: summarize(v) for k, v in step_ms.items()},
        "decode_step_ratio_vs_plain": {k: ratios(step_ms, k) for k in ("slots_no_adapter", "slots_with_adapter")},
        "decode_step_ratio_paired_no_adapter": dict(
            summarize(paired), quartiles=[float(np.percentile(paired, q)) for q in (25, 50, 75)], steps_per_block=25),
        "prefill_ms": {k: summarize(v) for k, v in prefill_ms.items()},
        "prefill_ratio_vs_plain": {k: ratios(prefill_ms, k) for k in ("slots_no_adapter", "slots_with_adapter")},
        "checks": {
            "no_adapter_tokens_equal_plain": True,
            "with_adapter_vs_merged_first_differing_token": agree, "tokens_compared": len(with_a),
            "last_logits_mean_abs_vs_peft_merged_fp32": {
                "slots_with_adapter": float(np.abs(got[0] - want).mean()),
                "merged_artifact": float(np.abs(merged_int[0] - want).mean()),
                "plain_no_adapter": float(np.abs(base[0] - want).mean())},
        },
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
