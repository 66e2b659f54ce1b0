"""Prompt (prefill) time of this checkout against another revision, on the same artifacts.

    python bench/prefill_ab.py --against REV ARTIFACT [ARTIFACT ...] [--tokens 32,128,512]
                               [--rounds 3] [--repeats 5] [--out FILE]

REV is checked out in a temporary git worktree. Each round runs, per artifact, one process
on REV's code and one on this checkout's, alternating (this host's speed moves within
minutes, so the two sides are compared round by round); a process loads the artifact and
times `--repeats` prefills of each prompt length after one warm-up, keeping the median.
Reported per artifact and length: both sides' medians per round and the ratio REV / this
(above 1: this checkout is faster) as min / median / max over the rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report_json import emit  # noqa: E402  (bench/, the script's own directory)


def _child(code: str, artifact: str, tokens: list[int], repeats: int) -> dict:
    """In a process of its own: the median prefill seconds per prompt length on `code`'s glmc."""
    sys.path.insert(0, code)
    import numpy as np

    import glmc

    assert Path(glmc.__file__).resolve().is_relative_to(Path(code).resolve()), glmc.__file__
    rt = glmc.load(artifact)
    out = {}
    for n in tokens:
        ids = list(range(5, 5 + n))
        rt.prefill([ids])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rt.prefill([ids])
            times.append(time.perf_counter() - t0)
        out[str(n)] = float(np.median(times))
    return out


def _worktree(rev: str) -> Path:
    """REV checked out in a temporary directory, its glmc.backends importable from there (the
    package maps `backends/` to glmc.backends; an editable install would map it to this checkout)."""
    where = Path(tempfile.mkdtemp(prefix="glmc-ab-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(where), rev],
                   check=True, capture_output=True)
    (where / "glmc" / "backends").symlink_to("../backends")
    return where


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--against", help="the revision to compare with (required)")
    ap.add_argument("--tokens", default="32,128,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.child:
        print(json.dumps(_child(args.child, args.artifacts[0], tokens, args.repeats)))
        return 0
    if not args.against:
        ap.error("--against REV is required")
    from glmc.measure import summarize          # (not before a child has put its code first)

    other = _worktree(args.against)
    try:
        sides = {args.against: str(other), "this": str(ROOT)}
        got = {a: {s: [] for s in sides} for a in args.artifacts}
        for _ in range(args.rounds):
            for artifact in args.artifacts:
                for side, code in sides.items():
                    run = subprocess.run([sys.executable, __file__, artifact, "--child", code, "--tokens", args.tokens, "--repeats", str(args.repeats)],
                                         capture_output=True, text=True)
                    if run.returncode:
                        raise SystemExit(f"{side} on {artifact} failed:\n{run.stderr[-2000:]}")
                    got[artifact][side].append(json.loads(run.stdout.strip().splitlines()[-1]))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], capture_output=True)
    out = {"against": args.against, "rounds": args.rounds, "repeats": args.repeats, "artifacts": {}}
    for artifact, by_side in got.items():
        rows = {}
        for n in map(str, tokens):
            old = [r[n] for r in by_side[args.against]]
            new = [r[n] for r in by_side["this"]]
            rows[n] = {f"{args.against}_ms": [round(x * 1e3, 1) for x in old], "this_ms": [round(x * 1e3, 1) for x in new],
                       "ratio": {k: round(v, 3) for k, v in summarize([o / t for o, t in zip(old, new)]).items()
                                 if k != "n"}}
        out["artifacts"][artifact] = rows
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
