"""Progression: factorize → heal → save a member → factorize that member at a lower target → …

Each member is cut from the previous (healed) one, as in the PLRD paper, so healing compounds. A
member folder appears only when complete (written atomically with its provenance.json), which makes a
build resumable: rerun the same command after a crash and finished members are loaded, not redone.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from family.errors import FamilyError
from family.registry import member_name, now_iso, parent_name, sync_family
from family.storage import atomic_dir, atomic_write_text
from plrd.calibrate import collect_grams
from plrd.data import pack, read_source, tokenize
from plrd.factorize import Allocation, Method, count_parameters, factorize
from plrd.heal import HealConfig, heal
from plrd.parent import load_parent

PROVENANCE = "provenance.json"


@dataclass
class BuildConfig:
    parent: Path
    targets: list[float]
    calib: str
    out: Path
    name: str
    heal: HealConfig
    method: Method = "whitened"
    allocation: Allocation = "allocated"
    calib_sequences: int = 64
    calib_seq_len: int = 512
    seed: int = 0
    command: str = field(default_factory=lambda: shlex.join(["family", *sys.argv[1:]]))


def parse_targets(text: str) -> list[float]:
    """'0.9,0.8,0.7' → [0.9, 0.8, 0.7]; strictly decreasing fractions in (0, 1)."""
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise FamilyError(f"--targets must be comma-separated fractions like 0.9,0.8,0.7, got {text!r}") from None
    if not targets:
        raise FamilyError("--targets is empty")
    for t in targets:
        if not 0.0 < t < 1.0:
            raise FamilyError(f"target {t} is out of range: each target is a fraction of the parent's parameters in (0, 1)")
    if any(b >= a for a, b in zip(targets, targets[1:])):
        raise FamilyError(f"--targets must be strictly decreasing (each member is cut from the previous one), got {text}")
    return targets


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


def build_family(cfg: BuildConfig, progress: bool = True) -> list[Path]:
    """Build every member of `cfg.targets` that is not already on disk; return all member folders."""
    if not cfg.targets or any(b >= a for a, b in zip(cfg.targets, cfg.targets[1:])):
        raise FamilyError("targets must be non-empty and strictly decreasing")
    source = read_source(cfg.calib)  # fail on a bad data path before loading anything heavy
    parent, tokenizer = load_parent(cfg.parent)
    parent_params = count_parameters(parent)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    parent_dir = out / parent_name(cfg.name)
    if not is_complete(parent_dir):
        if (Path(cfg.parent) / "config.json").is_file():
            _link_or_copy_tree(Path(cfg.parent), parent_dir)
        else:  # a GGUF file or hub id: write the loaded parent out
            with atomic_dir(parent_dir) as staging:
                parent.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
        _write_provenance(parent_dir, {"method": "parent", "source": str(cfg.parent), "parameters": parent_params, "created_at": now_iso()})
    sync_family(out, parent_dir=parent_dir, family_name=cfg.name)

    ids = tokenize(tokenizer, source.text)
    calib = pack(ids, cfg.calib_seq_len, cfg.calib_sequences, seed=cfg.seed)
    heal_rows = pack(ids, cfg.heal.seq_len)
    heal_rows = heal_rows[torch.randperm(len(heal_rows), generator=torch.Generator().manual_seed(cfg.seed))]

    current, current_name, made = parent, parent_name(cfg.name), []
    for target in cfg.targets:
        name = member_name(cfg.name, target)
        member_dir = out / name
        if is_complete(member_dir):
            current = AutoModelForCausalLM.from_pretrained(member_dir, dtype=torch.float32).eval()
            current_name = name
            made.append(member_dir)
            continue
        started, t0 = now_iso(), time.perf_counter()
        grams = collect_grams(current, calib, progress=progress) if cfg.method == "whitened" else None
        member = factorize(current, target, parent_params, grams=grams, allocation=cfg.allocation, progress=progress)
        del grams
        heal_result = None
        if cfg.heal.tokens > 0:
            teacher = parent if cfg.heal.distill_weight > 0 else None
            heal_result = heal(member, heal_rows, cfg.heal, teacher=teacher, progress=progress)
        params = count_parameters(member)
        with atomic_dir(member_dir) as staging:
            member.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            _write_provenance(
                staging,
                {
                    "method": f"plrd-{cfg.method}-svd",
                    "allocation": cfg.allocation,
                    "target": target,
                    "parameters": params,
                    "achieved_fraction": params / parent_params,
                    "parent": parent_name(cfg.name),
                    "derived_from": current_name,
                    "calibration": {
                        "source": source.spec, "sha256": source.sha256,
                        "sequences": cfg.calib_sequences, "seq_len": cfg.calib_seq_len,
                    },
                    "healing": {**asdict(cfg.heal), **(asdict(heal_result) if heal_result else {"steps": 0})},
                    "seed": cfg.seed,
                    "started_at": started,
                    "finished_at": now_iso(),
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "command": cfg.command,
                },
            )
        sync_family(out, parent_dir=parent_dir, family_name=cfg.name)
        current, current_name = member, name
        made.append(member_dir)
    return made
