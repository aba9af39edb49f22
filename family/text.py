"""Text for calibration, healing and evaluation: plain text, JSONL, or a Hugging Face dataset.

A source is named by one string so that it fits a CLI flag and a provenance record:
- `path/to/file.txt`: the whole file;
- `path/to/file.jsonl` or `path/to/file.jsonl:field`: one JSON object a line, its `text` (or `field`;
  `read_source(spec, field=...)` / `--calib-field` name it too);
- `hf:name[/config][:split][#field]`: a Hugging Face dataset, where `datasets` is installed and reachable.
The text is tokenized once and cut into fixed-length sequences (packing, no padding): `pack` for
calibration and healing (a number of sequences or a token budget, drawn repeatably with a seed);
evaluation windows are `family.accuracy.windows`. It lives on the ground floor because both sides
read text: plrd/ to calibrate and heal, `family eval` and `family profile` to measure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from family.errors import FamilyError
from family.storage import sha256_file


@dataclass(frozen=True)
class TextSource:
    spec: str  # as given by the user
    text: str
    sha256: str | None  # of the file, when the source is a file


def _read_jsonl(path: Path, field: str) -> str:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FamilyError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or field not in obj:
                raise FamilyError(f"{path}:{lineno}: no field {field!r}")
            texts.append(str(obj[field]))
    return "\n\n".join(texts)


def _read_hf(spec: str) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise FamilyError("a hf: data source needs the `datasets` package (pip install 'llm-family[datasets]')") from exc
    rest, _, field = spec.removeprefix("hf:").partition("#")
    name, _, split = rest.partition(":")
    # `owner/name/config`: the config is after the second slash (`name` alone may hold one slash).
    name, _, config = name.rpartition("/") if name.count("/") > 1 else (name, "", "")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # offline, unknown name, bad split: datasets raises many kinds
        raise FamilyError(f"cannot load dataset {name!r}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from exc
    field = field or "text"
    if field not in ds.column_names:
        raise FamilyError(f"dataset {name!r} has no column {field!r} (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(str(t) for t in ds[field])


def read_source(spec: str | Path, field: str | None = None) -> TextSource:
    """Read a text source named as described in the module docstring; `field` names a JSONL field
    (or a dataset column) when the spec does not."""
    spec = str(spec)
    if spec.startswith("hf:"):
        if field and "#" not in spec:
            spec = f"{spec}#{field}"
        return TextSource(spec, _read_hf(spec), None)
    path_part, _, spec_field = spec.partition(".jsonl:")
    if spec_field:
        path, field = Path(path_part + ".jsonl"), spec_field
    else:
        path, field = Path(spec), field or "text"
    if not path.is_file():
        raise FamilyError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        text = _read_jsonl(path, field)
    else:
        text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise FamilyError(f"data source is empty: {spec}")
    return TextSource(spec, text, sha256_file(path))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def pack(
    ids: torch.Tensor, seq_len: int, num_sequences: int | None = None, seed: int | None = None, num_tokens: int | None = None
) -> torch.Tensor:
    """Cut `ids` into (N × seq_len) rows; N from `num_sequences`, or enough rows for `num_tokens`.

    With a seed the N rows are drawn at random (repeatable) instead of the first N; asking for more
    rows than the text holds repeats rows (the token budget is honoured, the data is cycled).
    """
    if seq_len < 1:
        raise FamilyError(f"sequence length must be ≥ 1, got {seq_len}")
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    if len(rows) == 0:
        raise FamilyError(f"not enough text for one sequence of {seq_len} tokens ({len(ids)} tokens)")
    if num_tokens is not None:
        num_sequences = max(1, -(-num_tokens // seq_len))
    if num_sequences is None:
        return rows
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(rows), generator=g)
        picks = order[torch.arange(num_sequences) % len(rows)]  # repeat rows if asked for more than exist
        return rows[picks]
    return rows[torch.arange(num_sequences) % len(rows)]
