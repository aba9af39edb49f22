"""Text that ships with the package, so that a fresh clone builds and evaluates a family with no
outside corpus: seed chat prompts (the parent answers them to make the distillation corpus), text
openers (the parent continues them: plain language), held-out chat prompts and a held-out plain text
(evaluation only: never used for calibration or healing). All of it is the project's own writing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from family.errors import FamilyError

HERE = Path(__file__).resolve().parent
SEED_PROMPTS = HERE / "seed_prompts.jsonl"
EVAL_PROMPTS = HERE / "eval_prompts.jsonl"
TEXT_OPENERS = HERE / "text_openers.txt"
HELDOUT_TEXT = HERE / "heldout.txt"


@dataclass(frozen=True)
class Prompt:
    category: str
    prompt: str


def read_prompts(path: Path | str) -> list[Prompt]:
    """One JSON object a line with `prompt` (and optionally `category`)."""
    path = Path(path)
    if not path.is_file():
        raise FamilyError(f"prompt file not found: {path}")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append(Prompt(str(obj.get("category", "")), str(obj["prompt"])))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise FamilyError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field") from None
    if not out:
        raise FamilyError(f"prompt file is empty: {path}")
    return out


def read_lines(path: Path | str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FamilyError(f"text file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
