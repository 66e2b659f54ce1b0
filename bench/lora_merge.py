"""What merging a LoRA adapter at compile costs: compile time with and without --lora.

    python bench/lora_merge.py [--preset small-glm] [--quant int4] [--rank 16] [--repeats 2]
                               [--out bench/results/lora-merge-small-glm.json]

The preset is written out as a checkpoint; an adapter (PEFT, random A and B, rank R on
q/k/v/o and the MLP) is made for it. Both compiles run with verification on, interleaved,
in one process; the report gives min/median/max seconds of each and the merged artifact's
max logits difference against PEFT's merge_and_unload (fp32 reference, the artifact at
--quant).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)


def main(argv=None) -> int:
    import numpy as np
    import peft
    import torch

    import glmc
    from glmc.checkpoint import load
    from glmc.measure import summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-glm")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="glmc-lora-"))
    model = load(args.preset).model
    model.save_pretrained(work / "base")
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, init_lora_weights=False)
    pm = peft.get_peft_model(load(args.preset).model, cfg)
    with torch.no_grad():       # PEFT's random init is large for a 1024-wide model: scale B down
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    pm.save_pretrained(work / "lora")
    times: dict[str, list[float]] = {"base": [], "lora": []}
    arts = {}
    for _ in range(args.repeats):
        for kind in ("base", "lora"):
            t0 = time.perf_counter()
            arts[kind] = glmc.compile(work / "base", work / f"{kind}.glmc", quant=args.quant, progress=False,
                                      lora=[work / "lora"] if kind == "lora" else ())
            times[kind].append(time.perf_counter() - t0)
    merged = peft.PeftModel.from_pretrained(load(args.preset).model, work / "lora").merge_and_unload()
    ids = list(range(5, 69))
    with torch.no_grad():
        want = merged(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = glmc.load(arts["lora"]).logits(ids)
    base = glmc.load(arts["base"]).logits(ids)
    report = {
        "what": "compile seconds with and without --lora (verification on)",
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "glmc": glmc.__version__},
        "preset": args.preset, "quant": args.quant, "rank": args.rank, "targets": targets,
        "adapter_parameters": sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n),
        "compile_seconds": {k: summarize(v) for k, v in times.items()},
        "merge_overhead_seconds_median": float(np.median(times["lora"]) - np.median(times["base"])),
        "merged_vs_peft": {"max_abs": float(np.abs(got - want).max()),
                           "mean_abs": float(np.abs(got - want).mean()),
                           "base_vs_peft_mean_abs": float(np.abs(base - want).mean())},
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
