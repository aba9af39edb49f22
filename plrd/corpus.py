"""The distillation corpus: the parent's own chat answers and text continuations, made from prompts
that ship with the package (no outside corpus).

Members are healed on what the parent itself says (self-data distillation keeps a model's behaviour
far better than fine-tuning on outside text; healing on WikiText taught members its markup). Two kinds
of record:
- `chat`: a seed prompt through the parent's chat template, and the parent's answer: the first
  `greedy_tokens` tokens greedy, the rest sampled (`samples_per_prompt` answers per prompt);
- `text`: a plain-text opener and the parent's sampled continuation (general language).

The corpus is cached under the runs folder, in a folder named by a hash of everything that decides
its content (the parent's weights, the prompt files, the settings), with `meta.json` (how it was made,
the sha256 of `corpus.jsonl`; the generation dtype is part of it: bf16 where the hardware does bf16
natively, fp32 elsewhere, so the corpus of a given parent and seed is the same on every machine of one
kind). It is written a batch at a time, so an interrupted run resumes at the
first unfinished batch; the same seed gives the same corpus.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from family import data as shipped
from family.errors import FamilyError
from family.hardware import fast_dtype
from family.generate import chat_prompt_ids, generate
from family.storage import atomic_write_text, sha256_file

CORPUS_FILE = "corpus.jsonl"
META_FILE = "meta.json"


@dataclass(frozen=True)
class CorpusConfig:
    samples_per_prompt: int = 1
    max_new_tokens: int = 96  # per chat answer
    text_tokens: int = 64  # per plain-text continuation
    greedy_tokens: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 32
    max_prompts: int | None = None  # None: every seed prompt
    max_openers: int | None = None  # None: every opener
    dtype: str = field(default_factory=fast_dtype)  # generation dtype: bf16 only where it is native (family.hardware)
    seed: int = 0


@dataclass(frozen=True)
class Job:
    kind: str  # "chat" | "text"
    key: str  # prompt index and sample number
    source: str  # the prompt or opener
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


@dataclass
class Corpus:
    folder: Path
    records: list[dict]  # {"kind", "key", "source", "ids", "prompt_len", "answer"}
    meta: dict

    @property
    def tokens(self) -> int:
        return sum(len(r["ids"]) for r in self.records)

    def token_ids(self) -> torch.Tensor:
        """Every record's ids, concatenated in order (for packing into training rows)."""
        return torch.tensor([t for r in self.records for t in r["ids"]], dtype=torch.long)


def _jobs(tokenizer, cfg: CorpusConfig, prompts_path: Path, openers_path: Path) -> list[Job]:
    prompts = shipped.read_prompts(prompts_path)[: cfg.max_prompts]
    openers = shipped.read_lines(openers_path)[: cfg.max_openers]
    jobs = [
        Job("chat", f"{i}.{s}", p.prompt, tuple(chat_prompt_ids(tokenizer, p.prompt)), cfg.max_new_tokens)
        for s in range(cfg.samples_per_prompt) for i, p in enumerate(prompts)
    ]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    jobs += [
        Job("text", f"t{i}", o, tuple(bos + tokenizer(o, add_special_tokens=False)["input_ids"]), cfg.text_tokens)
        for i, o in enumerate(openers)
    ]
    return jobs


def corpus_key(parent_dir: Path, cfg: CorpusConfig, prompts_path: Path, openers_path: Path) -> str:
    """A hash of everything that decides the corpus's content."""
    weights = sorted(Path(parent_dir).glob("*.safetensors"))
    if not weights:
        raise FamilyError(f"no safetensors weights in {parent_dir}")
    h = hashlib.sha256()
    for w in weights:  # size + the first and last MiB: cheap, and changes with any re-conversion
        h.update(str(w.stat().st_size).encode())
        with open(w, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, w.stat().st_size - (1 << 20)))
            h.update(f.read())
    h.update(sha256_file(prompts_path).encode())
    h.update(sha256_file(openers_path).encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _read_records(path: Path) -> list[dict]:
    """Records of complete batches; a torn last line (crash mid-write) is dropped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    # Keep whole batches only: a batch is written with one write, but be safe about partial tails.
    last = out[-1]["batch"] if out else None
    if out and sum(r["batch"] == last for r in out) != out[-1]["batch_size"]:
        out = [r for r in out if r["batch"] != last]
    return out


def make_corpus(
    parent, tokenizer, parent_dir: Path, runs_dir: Path, cfg: CorpusConfig = CorpusConfig(), *,
    prompts_path: Path = shipped.SEED_PROMPTS, openers_path: Path = shipped.TEXT_OPENERS, progress: bool = True,
) -> Corpus:
    """The parent's distillation corpus: loaded from the cache when complete, else made (resuming)."""
    key = corpus_key(parent_dir, cfg, prompts_path, openers_path)
    folder = Path(runs_dir) / f"corpus-{Path(parent_dir).name.removeprefix('parent-')}-{key}"
    meta_path, corpus_path = folder / META_FILE, folder / CORPUS_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("complete") and sha256_file(corpus_path) == meta["sha256"]:
            return Corpus(folder, _read_records(corpus_path), meta)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(tokenizer, cfg, prompts_path, openers_path)
    # Batches of one kind and similar prompt length: less padding, and the same batches every run.
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].kind, len(jobs[i].prompt_ids), i))
    batches = [order[b : b + cfg.batch_size] for b in range(0, len(order), cfg.batch_size)]
    records = _read_records(corpus_path)
    done = {r["batch"] for r in records}
    with open(corpus_path, "w", encoding="utf-8") as f:  # rewrite what survived, then append
        for r in records:
            f.write(json.dumps(r) + "\n")
    model = copy.deepcopy(parent).to(getattr(torch, cfg.dtype)).eval()  # never round the parent itself
    total = sum(jobs[i].max_new_tokens for b in batches for i in b)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="corpus", disable=not progress)
    bar.update(sum(jobs[i].max_new_tokens for n, b in enumerate(batches) if n in done for i in b))
    start, made = time.perf_counter(), 0
    try:
        for n, batch in enumerate(batches):
            if n in done:
                continue
            group = [jobs[i] for i in batch]
            outs = generate(
                model, tokenizer, [list(j.prompt_ids) for j in group], max_new_tokens=group[0].max_new_tokens,
                greedy_tokens=cfg.greedy_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 100_003 + n,
            )
            lines = []
            for j, new in zip(group, outs):
                rec = {"batch": n, "batch_size": len(group), "kind": j.kind, "key": j.key, "source": j.source,
                       "prompt_len": len(j.prompt_ids), "ids": list(j.prompt_ids) + new,
                       "answer": tokenizer.decode(new, skip_special_tokens=True)}
                records.append(rec)
                lines.append(json.dumps(rec) + "\n")
                made += len(new)
            with open(corpus_path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
            bar.update(sum(j.max_new_tokens for j in group))
            bar.set_postfix(tok_s=f"{made / (time.perf_counter() - start):.0f}")
    finally:
        bar.close()
        del model
    meta = {
        "complete": True, "config": asdict(cfg), "key": key, "parent": str(parent_dir),
        "prompts": {"path": str(prompts_path), "sha256": sha256_file(prompts_path)},
        "openers": {"path": str(openers_path), "sha256": sha256_file(openers_path)},
        "records": len(records), "tokens": sum(len(r["ids"]) for r in records),
        "generated_tokens": sum(len(r["ids"]) - r["prompt_len"] for r in records),
        "sha256": sha256_file(corpus_path),
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return Corpus(folder, records, meta)
