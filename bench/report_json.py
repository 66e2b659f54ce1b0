"""What the bench/ scripts share: printing a JSON report and saving it where asked."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def emit(report: dict, out: Path | None) -> None:
    """Print the report as JSON and, with `out`, write it there (parents created)."""
    text = json.dumps(report, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def matmul_args(doc: str, k: int, n: int, argv=None) -> argparse.Namespace:
    """The one-node matmul scripts' options: --k, --n (the weight's shape), --threads, --out."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--k", type=int, default=k)
    ap.add_argument("--n", type=int, default=n)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    return ap.parse_args(argv)
