"""Progression: cut → refit → heal → save a member → cut that member to a lower target → …

Each member is cut from the previous (healed) one, as in the PLRD paper. How it is cut is the method:
`width` (the default) keeps the highest-scoring neurons of every MLP of the previous member
(plrd/width.py); `whitened` / `plain` factor every projection at ranks from the previous member's
(whitened) spectra (plrd/factorize.py). With `init="refit"` (the default) every projection is then
refit, layer by layer, to the *parent's* outputs (plrd/refit.py), and healing distils from the parent
too, so errors do not compound down the family: every member is anchored to the parent. With
`on_policy.tokens > 0` healing is followed by distillation on the member's own answers to the seed
prompts (plrd/onpolicy.py; off by default: at the budgets measured here it did not pay, docs/results/faithfulness.md).

The data is the parent's own (`calib="parent"`, plrd/corpus.py): its answers to the shipped chat
prompts and its continuations of the shipped text openers, made once and cached under the runs
folder. A text source (file, JSONL, hf:) can replace it. A member folder appears only when complete
(written atomically with its provenance.json), which makes a build resumable: rerun the same command
after a crash and finished members are loaded, not redone.

On GPUs the same command runs data-parallel healing unchanged: `accelerate launch -m family.cli build ...`.
"""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from family import defaults
from family.data import SEED_PROMPTS, read_prompts
from family.errors import FamilyError
from family.generate import chat_prompt_ids
from family.registry import member_name, now_iso, parent_name, sync_family
from family.storage import atomic_dir, atomic_write_text
from plrd.calibrate import collect_grams
from plrd.corpus import CorpusConfig, make_corpus
from family.text import pack, read_source, tokenize
from plrd.factorize import Allocation, count_parameters, factorize
from plrd.heal import HealConfig, heal
from plrd.onpolicy import OnPolicyConfig, distill_on_policy
from plrd.parent import load_parent
from plrd.refit import sequential_refit
from plrd.sensitivity import output_sensitivity
from family.vocab_map import VocabMap
from plrd.vocab import choose_vocabulary, reencode, trim_model, trim_tokenizer, usage_on
from plrd.width import parent_neurons, prune_width, read_neurons, refit_rows, width_for, write_neurons

METHODS = ("whitened", "plain", "width")

PROVENANCE = "provenance.json"
VOCAB_METHOD = "the tokens the parent uses most on its corpus, closed under BPE merges, within the previous member's"


@dataclass
class BuildConfig:
    parent: Path
    targets: list[float]
    calib: str
    out: Path
    name: str | None  # None: from the parent's folder name (see `default_family_name`)
    heal: HealConfig
    method: str = defaults.METHOD  # one of METHODS: whitened / plain SVD (plrd/factorize.py), or width: MLP neurons pruned (plrd/width.py)
    allocation: Allocation = defaults.ALLOCATION
    init: str = "refit"  # "refit": sequential closed-form refit to the parent; "svd": the truncated SVD alone
    calib_sequences: int = defaults.CALIB_SEQUENCES
    calib_seq_len: int = defaults.CALIB_SEQ_LEN
    calib_field: str | None = None  # JSONL field / dataset column when the spec does not name it
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # with calib="parent"
    on_policy: OnPolicyConfig = field(default_factory=lambda: OnPolicyConfig(tokens=defaults.ON_POLICY_TOKENS))  # after healing, from the parent
    # Each member keeps the N tokens the parent uses most (plrd/vocab.py): one N for every member, or one
    # per target (non-increasing; each member's a subset of the previous one's); None: the parent's.
    vocab_size: int | tuple[int, ...] | None = defaults.VOCAB_SIZE
    runs_dir: Path = field(default_factory=lambda: defaults.RUNS_DIR)  # where the parent's corpus is cached
    seed: int = 0
    command: str = field(default_factory=lambda: shlex.join(["family", *sys.argv[1:]]))


def default_family_name(parent: str | Path) -> str:
    """The family's name when none is given: the parent's folder name without a `parent-` prefix
    (runs/parent-smollm2-135m → smollm2-135m), a GGUF file's stem, or a hub id's last part."""
    path = Path(str(parent))
    name = path.stem if path.suffix == ".gguf" else path.name
    return (name.removeprefix("parent-") or name).lower()


def parse_targets(text: str) -> list[float]:
    """'0.9,0.8,0.7' → [0.9, 0.8, 0.7]; strictly decreasing fractions in (0, 1)."""
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise FamilyError(f"--targets must be comma-separated fractions like 0.9,0.8,0.7, got {text!r}") from None
    if not targets:
        raise FamilyError("--targets is empty")
    for t in targets:
        if not 0.0 < t < 1.0:  # also refuses nan
            raise FamilyError(f"target {t} is out of range: each target is a fraction of the parent's parameters in (0, 1)")
    if any(b >= a for a, b in zip(targets, targets[1:])):
        raise FamilyError(f"--targets must be strictly decreasing (each member is cut from the previous one), got {text}")
    return targets


def parse_vocab_sizes(text: str) -> int | tuple[int, ...] | None:
    """'24576' → 24576 (every member); '24576,16384,16384' → one per target; '0' → None (the parent's)."""
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise FamilyError(f"--vocab-size must be a whole number or one per target like 24576,16384,16384, got {text!r}") from None
    if not sizes or any(s < 0 for s in sizes):
        raise FamilyError(f"--vocab-size must be sizes ≥ 0, got {text!r}")
    return None if sizes == (0,) else sizes[0] if len(sizes) == 1 else sizes


def is_complete(member_dir: Path) -> bool:
    return (member_dir / PROVENANCE).is_file() and (member_dir / "config.json").is_file()


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Place the parent inside the family folder (hard links where possible), so the folder is self-contained."""
    with atomic_dir(dst) as staging:
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, staging / f.name)
                except OSError:
                    shutil.copy2(f, staging / f.name)


def _write_provenance(member_dir: Path, record: dict) -> None:
    import json

    atomic_write_text(member_dir / PROVENANCE, json.dumps(record, indent=2, default=str) + "\n")


def _heal_record(result) -> dict:
    """What provenance keeps of a heal: totals and a coarse loss curve (at most 20 points)."""
    record = asdict(result)
    curve = record.pop("losses")
    stride = max(1, len(curve) // 20)
    record["loss_curve"] = [round(x, 4) for x in curve[::stride]]
    return record


def vocab_sizes(vocab_size: int | tuple[int, ...] | None, targets: list[float], parent_size: int) -> list[int]:
    """Each target's vocabulary size (the parent's where nothing is trimmed)."""
    sizes = [parent_size] * len(targets) if not vocab_size else [vocab_size] * len(targets) if isinstance(vocab_size, int) else list(vocab_size)
    if len(sizes) != len(targets):
        raise FamilyError(f"--vocab-size gives {len(sizes)} sizes for {len(targets)} targets: give one for all, or one per target")
    sizes = [min(s, parent_size) if s else parent_size for s in sizes]
    if any(b > a for a, b in zip(sizes, sizes[1:])):
        raise FamilyError(f"--vocab-size must not grow down the family (each member speaks a subset of the previous one's), got {sizes}")
    return sizes


def _member_tokenizers(sizes: list[int], parent, tokenizer, sequences: list[list[int]], member_dirs: list[Path], seed: int,
                       seq_len: int, progress: bool) -> list:
    """Each member's tokenizer: a finished member's own, so that a resumed build keeps the vocabulary
    it started with; else the previous member's where the size is the same; else the `size` tokens
    the parent uses most on its data, among those the previous member speaks."""
    usage, previous, out = None, tokenizer, []
    for size, member_dir in zip(sizes, member_dirs):
        if is_complete(member_dir):
            member_tok = AutoTokenizer.from_pretrained(member_dir)
            if len(member_tok.get_vocab()) != size:
                raise FamilyError(f"{member_dir} has a vocabulary of {len(member_tok.get_vocab())} tokens, not --vocab-size {size}: "
                                  "build into another --out, or give its size")
            member_tok = tokenizer if size == len(tokenizer.get_vocab()) else member_tok
        elif size == len(previous.get_vocab()):
            member_tok = previous
        else:
            if usage is None:
                usage = usage_on(parent, sequences, seq_len=seq_len, seed=seed, progress=progress)
            within = None if previous is tokenizer else VocabMap.between(tokenizer, previous).to_parent.tolist()
            member_tok = trim_tokenizer(tokenizer, choose_vocabulary(tokenizer, usage, size, within=within))
        out.append(member_tok)
        previous = member_tok
    return out


def build_family(cfg: BuildConfig, progress: bool = True) -> list[Path]:
    """Build every member of `cfg.targets` that is not already on disk; return all member folders."""
    if not cfg.targets or any(b >= a for a, b in zip(cfg.targets, cfg.targets[1:])):
        raise FamilyError("targets must be non-empty and strictly decreasing")
    if any(not 0.0 < t < 1.0 for t in cfg.targets):
        raise FamilyError(f"targets must be fractions of the parent's parameters in (0, 1), got {cfg.targets}")
    if cfg.method not in METHODS:
        raise FamilyError(f"unknown method {cfg.method!r} ({', '.join(METHODS)})")
    if cfg.init not in ("refit", "svd"):
        raise FamilyError(f"unknown init {cfg.init!r} (refit or svd)")
    name = cfg.name or default_family_name(cfg.parent)
    from_parent = cfg.calib == defaults.CALIB_PARENT
    source = None if from_parent else read_source(cfg.calib, field=cfg.calib_field)  # fail on bad data before loading anything heavy
    parent, tokenizer = load_parent(cfg.parent)
    parent_params = count_parameters(parent)
    sizes = vocab_sizes(cfg.vocab_size, cfg.targets, parent.config.vocab_size)
    trimming = min(sizes) < parent.config.vocab_size
    if trimming and cfg.on_policy.tokens > 0:
        raise FamilyError("on-policy distillation does not fold the parent's vocabulary onto a trimmed one: use --vocab-size 0 with --on-policy-tokens")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # Under `accelerate launch` every process runs this function (factorization is deterministic, so
    # they agree); healing is data-parallel; only the main process writes to disk.
    state = PartialState()
    parent_dir = out / parent_name(name)
    if state.is_main_process and not is_complete(parent_dir):
        if (Path(cfg.parent) / "config.json").is_file():
            _link_or_copy_tree(Path(cfg.parent), parent_dir)
        else:  # a GGUF file or hub id: write the loaded parent out
            with atomic_dir(parent_dir) as staging:
                parent.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
        _write_provenance(parent_dir, {"method": "parent", "source": str(cfg.parent), "parameters": parent_params, "created_at": now_iso()})
    if state.is_main_process:
        sync_family(out, parent_dir=parent_dir, family_name=name)
    state.wait_for_everyone()

    if from_parent:
        # Named after the parent as given (runs/parent-X → corpus-X-<hash>), so other families of it reuse it.
        source_dir = Path(cfg.parent) if (Path(cfg.parent) / "config.json").is_file() else parent_dir
        corpus = make_corpus(parent, tokenizer, source_dir, cfg.runs_dir, cfg.corpus, progress=progress and state.is_main_process)
        sequences = [r["ids"] for r in corpus.records]
        data_record = {"source": "parent", "corpus": str(corpus.folder), "sha256": corpus.meta["sha256"],
                       "tokens": corpus.meta["tokens"], "generated_tokens": corpus.meta["generated_tokens"], "config": corpus.meta["config"]}
    else:
        sequences = [tokenize(tokenizer, source.text).tolist()]
        data_record = {"source": source.spec, "sha256": source.sha256}
    # The members' vocabularies: each speaks the tokens the parent uses most (plrd/vocab.py), a subset
    # of the previous member's; its data is re-encoded in them, and the parent's distribution is folded
    # onto them (`vocab`).
    member_dirs = [out / member_name(name, t) for t in cfg.targets]
    member_toks = _member_tokenizers(sizes, parent, tokenizer, sequences, member_dirs, cfg.seed, cfg.heal.seq_len,
                                     progress and state.is_main_process) if trimming else [tokenizer] * len(sizes)

    def data_in(member_tok):
        """Calibration and healing rows in a member's tokens."""
        seqs = sequences if member_tok is tokenizer else reencode(sequences, tokenizer, member_tok)
        ids = torch.tensor([t for seq in seqs for t in seq], dtype=torch.long)
        heal_rows = pack(ids, cfg.heal.seq_len)
        return pack(ids, cfg.calib_seq_len, cfg.calib_sequences, seed=cfg.seed), heal_rows[torch.randperm(len(heal_rows), generator=torch.Generator().manual_seed(cfg.seed))]

    # On-policy distillation: the member answers the corpus's own seed prompts (never the held-out eval prompts).
    seed_prompts = [chat_prompt_ids(tokenizer, p.prompt) for p in read_prompts(SEED_PROMPTS)[: cfg.corpus.max_prompts]] if cfg.on_policy.tokens > 0 else []

    # `neurons`: which of the parent's MLP neurons each neuron of `current` is (the refit's targets).
    current, current_tok, current_name, made, neurons = parent, tokenizer, parent_name(name), [], parent_neurons(parent)
    data_tok, calib, heal_rows, vocab = None, None, None, None
    for target, member_dir, member_tok in zip(cfg.targets, member_dirs, member_toks):
        this = member_dir.name
        if is_complete(member_dir):
            current = AutoModelForCausalLM.from_pretrained(member_dir, dtype=torch.float32).eval()
            neurons = read_neurons(member_dir, current, parent)
            current_tok, current_name = member_tok, this
            made.append(member_dir)
            continue
        started, t0 = now_iso(), time.perf_counter()
        if member_tok is not current_tok:  # a smaller vocabulary first: rows of the tied embedding, the kept tokens of `current`'s
            current = trim_model(copy.deepcopy(current), VocabMap.between(current_tok, member_tok).to_parent.tolist())
            current_tok = member_tok
        if data_tok is not member_tok:  # once per vocabulary: the data in its tokens, and how it sits in the parent's
            calib, heal_rows, data_tok = *data_in(member_tok), member_tok
            vocab = None if member_tok is tokenizer else VocabMap.between(tokenizer, member_tok)
        # The vocabulary cut alone may reach the target: then nothing is pruned, refit or distilled.
        width = width_for(current, target, parent_params) if cfg.method == "width" else None
        cut = width is None or width < current.config.intermediate_size
        grams = collect_grams(current, calib, progress=progress) if cut and cfg.method in ("whitened", "width") else None
        if not cut:
            member = current
        elif cfg.method == "width":
            member, neurons = prune_width(current, width, grams, neurons)
        else:
            sensitivity = output_sensitivity(current, calib[:16], progress=progress) if cfg.allocation == "sensitivity" else None
            member = factorize(current, target, parent_params, grams=grams, allocation=cfg.allocation, sensitivity=sensitivity, progress=progress)
        del grams
        refit_s = None
        if cut and cfg.init == "refit":
            t_refit = time.perf_counter()
            sequential_refit(parent, member, calib, output_rows=refit_rows(neurons), vocab=vocab, progress=progress)
            refit_s = round(time.perf_counter() - t_refit, 1)
        heal_result = None
        # A member cut only in its vocabulary is the parent's own logits on the kept tokens: distilling
        # it made it less faithful (agreement 0.960 → 0.927 and a loop the parent does not have; docs/results/faithfulness.md).
        if cfg.heal.tokens > 0 and cut:
            teacher = parent if cfg.heal.distill_weight > 0 or cfg.heal.hidden_weight > 0 else None
            heal_result = heal(member, heal_rows, cfg.heal, teacher=teacher, progress=progress, vocab=vocab)
        on_policy = distill_on_policy(member, parent, tokenizer, seed_prompts, cfg.on_policy, cfg.heal, progress=progress)
        params = count_parameters(member)
        if not state.is_main_process:
            state.wait_for_everyone()
            current, current_name = member, this
            made.append(member_dir)
            continue
        with atomic_dir(member_dir) as staging:
            member.save_pretrained(staging)
            member_tok.save_pretrained(staging)
            if member.config.intermediate_size != parent.config.intermediate_size:
                write_neurons(staging, neurons)
            _write_provenance(
                staging,
                {
                    "method": "vocabulary-trim" if not cut else "width-pruning" if cfg.method == "width" else f"plrd-{cfg.method}-svd",
                    "allocation": None if not cut else "uniform-width" if cfg.method == "width" else cfg.allocation,
                    "vocabulary": {"size": member.config.vocab_size, "parent_size": parent.config.vocab_size,
                                   "method": VOCAB_METHOD if vocab is not None else "the parent's"},
                    "target": target,
                    "parameters": params,
                    "achieved_fraction": params / parent_params,
                    "parent": parent_name(name),
                    "derived_from": current_name,
                    "init": None if not cut else {"method": cfg.init, "anchor": parent_name(name), "seconds": refit_s} if cfg.init == "refit" else {"method": "svd"},
                    "calibration": {
                        **data_record, "sequences": cfg.calib_sequences, "seq_len": cfg.calib_seq_len,
                    },
                    "healing": {**asdict(cfg.heal), **(_heal_record(heal_result) if heal_result else {"steps": 0})},
                    "healing_data": data_record,
                    "distillation": {
                        "teacher": parent_name(name), "weight": cfg.heal.distill_weight, "temperature": cfg.heal.temperature,
                    } if cfg.heal.distill_weight > 0 and cfg.heal.tokens > 0 else None,
                    "final_heal_loss": heal_result.final_loss if heal_result else None,
                    "on_policy": {
                        **asdict(cfg.on_policy), "teacher": parent_name(name), "rounds": len(on_policy),
                        "seconds": round(sum(r.seconds for r in on_policy), 1), "final_kl": on_policy[-1].final_loss,
                    } if on_policy else None,
                    "seed": cfg.seed,
                    "started_at": started,
                    "finished_at": now_iso(),
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "command": cfg.command,
                },
            )
        sync_family(out, parent_dir=parent_dir, family_name=name)
        state.wait_for_everyone()
        current, current_name = member, this
        made.append(member_dir)
    return made
