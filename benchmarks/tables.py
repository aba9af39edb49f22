"""How a benchmark ends: its rows as a markdown table (what the README's results tables are pasted
from), optionally as JSON, and the exact command that produced them. Benchmarks are run as scripts
(`python benchmarks/X.py`), so they import this as `tables`."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path


def command() -> str:
    return shlex.join(["python", *sys.argv])


def markdown(rows: list[dict], columns: list[tuple[str, Callable[[dict], object]]]) -> str:
    """One line per row; `columns`: (header, what the cell says for a row)."""
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def save_json(path: str | Path | None, payload, indent: int = 1) -> None:
    """`payload` as JSON at `path` (its folder made), when a path is given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=indent) + "\n")
