"""Every pass's match count (and node count after it) on every entry point, for the test
model variants x {fp32, int4, int8 + int8 embedding}: a fingerprint of what the compiler
does, to compare two checkouts (a refactor must leave it unchanged).

    python tools/pass_counts.py counts-new.json            # in this checkout
    (cd ../old && python /path/to/tools/pass_counts.py --root . counts-old.json)
    python tools/pass_counts.py --compare counts-old.json counts-new.json

Checkpoints are the seeded variants of tests/conftest.py, written to a temp dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

MODELS = ("glm-gqa", "glm-mha-tied", "glm4-mqa", "chatglm", "tiny-glm")
OPTIONS = ({}, {"quant": "int4"}, {"quant": "int8", "embedding": "int8"})


def collect(root: Path) -> dict:
    sys.path.insert(0, str(root))
    import glmc
    from tests.conftest import write_checkpoint

    out = {}
    with tempfile.TemporaryDirectory() as d:
        for variant in MODELS:
            src = variant if variant == "tiny-glm" else write_checkpoint(Path(d) / variant, variant)
            for opts in OPTIONS:
                art = glmc.compile(src, Path(d) / f"{variant}-{len(out)}.glmc", max_seq_len=64, verify=False,
                                   chunked_prefill=True, progress=False, **opts)
                passes = json.loads((art / "manifest.json").read_text())["passes"]
                out[f"{variant} {opts}"] = [(p["graph"], p["name"], p["matches"], p["nodes_after"]) for p in passes]
    return out


def compare(old: dict, new: dict, ignore: tuple = ()) -> list[str]:
    """Differences, ignoring passes named in `ignore` (passes that exist on one side only)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a = [tuple(r) for r in old.get(key, []) if r[1] not in ignore]
        b = [tuple(r) for r in new.get(key, []) if r[1] not in ignore]
        if a != b:
            diffs += [f"{key}: {x} -> {y}" for x, y in zip(a, b) if x != y] or [f"{key}: {len(a)} vs {len(b)} records"]
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    p.add_argument("--compare", action="store_true", help="compare two count files")
    p.add_argument("--ignore", action="append", default=[], help="a pass name present on one side only")
    args = p.parse_args(argv)
    if args.compare:
        old, new = (json.loads(f.read_text()) for f in args.files)
        diffs = compare(old, new, tuple(args.ignore))
        print("\n".join(diffs) if diffs else f"identical: {len(old)} configurations")
        return 1 if diffs else 0
    args.files[0].write_text(json.dumps(collect(args.root.resolve()), indent=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
