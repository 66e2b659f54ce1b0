"""What the bench/ scripts share: printing a JSON report and saving it where asked."""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, out: Path | None) -> None:
    """Print the report as JSON and, with `out`, write it there (parents created)."""
    text = json.dumps(report, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
