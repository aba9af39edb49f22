"""PLRD recipes on SmolLM2-135M, judged by faithfulness to the parent (issue 10): members at
0.9/0.8/0.7 of the parameters, one row per recipe, measured as `family eval` measures them.

    python benchmarks/plrd_recipes.py --parent runs/parent-smollm2-135m \
        --default-family runs/family-smollm2-135m --json runs/bench/plrd_recipes.json
    python benchmarks/plrd_recipes.py --rows refit,width-refit --json runs/bench/plrd_recipes_width.json

Columns: chat agreement (teacher-forced top-1 on the parent's greedy answers to the 48 held-out chat
prompts), chat KL, held-out plain-text perplexity relative to the parent (family/data/heldout.txt:
never used for calibration or healing), degenerate greedy answers out of 48, the training tokens and
the wall time of making each member. Rows:
- `WikiText LM loss (old default)`: whitened SVD calibrated on WikiText-2 valid, 20k tokens of LM-loss
  healing on it per member, progressive (the default before this change; needs ../shared);
- `whitened SVD`: calibrated on the parent's own corpus, ranks by `--allocation` (the default's), no training;
- `+ sequential refit`: the same ranks, every projection refit to the parent layer by layer;
- `width pruning`: no low rank; every MLP keeps its highest-scoring neurons (plrd/width.py), no training;
- `width + refit`: the same neurons, every projection refit to the parent layer by layer;
- `+ KD on parent data (SVD)`: `family build --method whitened` with the other defaults (refit, then
  distillation from the parent on its corpus, progressive). With --default-family the members of such
  a family are measured (`scripts/run_default.sh` built one until width pruning became the default),
  else they are built here;
- `width + refit + KD`: with --width-family, the members of a `family build --vocab-size 0` family
  (width pruning with the whole vocabulary: `run_default.sh`'s family before 2026-12-06);
- `vocabulary + width + refit + KD`: with --vocab-family, the members of a family with a trimmed
  vocabulary (today's `run_default.sh` family), scored in their own tokens as `family eval` scores them.
Rows built here keep the parent's whole vocabulary (`vocab_size=None`), as they did when first measured.
`--rows` picks rows (old, svd, refit, width, width-refit, kd, width-kd, vocab-kd; default: those of the original
table). The no-training rows are each cut from the parent, the others progressively. The parent's
corpus is made once (cached); its time is reported apart.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import family  # noqa: F401  (registers the low-rank architecture)
from family import chat_eval, defaults
from family.accuracy import perplexity, perplexity_in_parent_tokens, windows
from family.data import read_prompts
from family.registry import read_registry
from plrd.build import BuildConfig, build_family
from plrd.calibrate import collect_grams
from plrd.corpus import CorpusConfig, make_corpus
from family.text import pack, read_source, tokenize
from plrd.factorize import count_parameters, factorize, spectra
from plrd.heal import HealConfig
from plrd.parent import load_parent
from plrd.refit import sequential_refit
from plrd.sensitivity import output_sensitivity
from plrd.width import parent_neurons, prune_width, refit_rows, width_for

ROWS = ("old", "svd", "refit", "width", "width-refit", "kd", "width-kd", "vocab-kd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", default=str(defaults.DEFAULT_PARENT_DIR))
    ap.add_argument("--targets", default="0.9,0.8,0.7")
    ap.add_argument("--default-family", type=Path, default=None, help="measure this family's members as the KD row (built by run_default.sh)")
    ap.add_argument("--heal-tokens", type=int, default=20_000, help="KD row when built here: training tokens per member")
    ap.add_argument("--old-heal-tokens", type=int, default=20_000, help="the old default's LM-loss healing tokens per member")
    ap.add_argument("--skip-old", action="store_true", help="leave out the WikiText row (it needs ../shared)")
    ap.add_argument("--rows", default="old,svd,refit,kd", help=f"which rows: {', '.join(ROWS)}")
    ap.add_argument("--allocation", default=defaults.ALLOCATION, choices=("allocated", "sensitivity", "uniform"), help="ranks of the SVD rows")
    ap.add_argument("--width-family", type=Path, default=None, help="the width-kd row: a family built with `family build --method width`")
    ap.add_argument("--vocab-family", type=Path, default=None, help="the vocab-kd row: a family built with a trimmed vocabulary (run_default.sh's)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench/recipes"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    command = shlex.join(["python", *sys.argv])
    targets = [float(t) for t in args.targets.split(",")]
    wanted = set(args.rows.split(","))
    if unknown := sorted(wanted - set(ROWS)):
        ap.error(f"--rows: unknown {', '.join(unknown)} (give {', '.join(ROWS)})")
    if args.skip_old:
        wanted.discard("old")
    if "width-kd" in wanted and not args.width_family:
        ap.error("--rows width-kd needs --width-family (a family built with `family build --method width`)")
    if "vocab-kd" in wanted and not args.vocab_family:
        ap.error("--rows vocab-kd needs --vocab-family (a family built with a trimmed vocabulary, as run_default.sh builds it)")

    parent_dir = Path(args.parent)
    parent, tok = load_parent(parent_dir)
    P = count_parameters(parent)
    t0 = time.perf_counter()
    corpus = make_corpus(parent, tok, parent_dir, defaults.RUNS_DIR, CorpusConfig())
    corpus_s = time.perf_counter() - t0
    ids = corpus.token_ids()
    calib = pack(ids, 256, 64, seed=0)
    prompts = [p.prompt for p in read_prompts(defaults.EVAL_PROMPTS)]
    ref = chat_eval.reference(parent, tok, prompts)
    held_ids = tokenize(tok, read_source(defaults.EVAL_TEXT).text)
    parent_ppl = perplexity(parent, held_ids, 512, None, progress=False)
    rows: list[dict] = []

    def record(recipe: str, target: float, model, tokens: int, wall_s: float, own_tok=None) -> None:
        c = chat_eval.score_member(model, parent, tok, own_tok or tok, ref, name=f"{recipe} {target}")
        if model.config.vocab_size < parent.config.vocab_size:  # a trimmed vocabulary: per parent token, as `family eval`
            ppl = perplexity_in_parent_tokens(model, own_tok, tok, windows(held_ids, 512, None), progress=False).perplexity
        else:
            ppl = perplexity(model, held_ids, 512, None, progress=False)
        row = {"recipe": recipe, "target": target, "params_fraction": round(count_parameters(model) / P, 4),
               "chat_agreement": round(c.agreement, 4), "chat_kl": round(c.kl, 4), "ppl_ratio": round(ppl / parent_ppl, 3),
               "degenerate": f"{round(c.degenerate_share * len(prompts))}/{len(prompts)}", "train_tokens": tokens,
               "wall_s": round(wall_s, 1), "first_answer": c.answers[0][:100]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"command": command, "rows": rows, "complete": False}, indent=2))

    def from_disk(root: Path, recipe: str) -> None:
        reg = read_registry(root)
        for m in reg.members:
            if m.is_parent:
                continue
            prov = json.loads((root / m.path / "provenance.json").read_text())
            member = AutoModelForCausalLM.from_pretrained(root / m.path, dtype=torch.float32).eval()
            record(recipe, prov["target"], member, prov["healing"].get("tokens") or 0, prov["wall_s"], AutoTokenizer.from_pretrained(root / m.path))

    # The old default: WikiText calibration and LM-loss healing, progressive.
    if "old" in wanted:
        old = args.work / "old-wikitext"
        build_family(BuildConfig(
            parent=parent_dir, targets=targets, calib=str(defaults.WIKITEXT_VALID), out=old, name="old", init="svd",
            heal=HealConfig(tokens=args.old_heal_tokens, seq_len=256, grad_accum=2, lr=3e-4, train="factors"),  # as it was
            calib_sequences=32, calib_seq_len=512, command=command, vocab_size=None,
        ))
        from_disk(old, "WikiText LM loss (old default)")

    # Whitened SVD / width pruning, and each + refit, cut from the parent (no training, nothing to progress from).
    t_spec = time.perf_counter()
    grams = collect_grams(parent, calib) if wanted & {"svd", "refit", "width", "width-refit"} else None
    grams_s = time.perf_counter() - t_spec
    if wanted & {"svd", "refit"}:
        t_spec = time.perf_counter()
        specs = spectra(parent, grams)
        sensitivity = output_sensitivity(parent, calib[:16]) if args.allocation == "sensitivity" else None
        shared_s = grams_s + time.perf_counter() - t_spec
        for target in targets:
            t = time.perf_counter()
            member = factorize(parent, target, P, grams=None, specs=specs, allocation=args.allocation, sensitivity=sensitivity, progress=False)
            cut_s = shared_s + time.perf_counter() - t
            if "svd" in wanted:
                record("whitened SVD", target, member, 0, cut_s)
            if "refit" in wanted:
                t = time.perf_counter()
                sequential_refit(parent, member, calib)
                record("+ sequential refit", target, member, 0, cut_s + time.perf_counter() - t)
    if wanted & {"width", "width-refit"}:
        for target in targets:
            t = time.perf_counter()
            member, neurons = prune_width(parent, width_for(parent, target, P), grams, parent_neurons(parent))
            cut_s = grams_s + time.perf_counter() - t
            if "width" in wanted:
                record("width pruning", target, member, 0, cut_s)
            if "width-refit" in wanted:
                t = time.perf_counter()
                sequential_refit(parent, member, calib, output_rows=refit_rows(neurons))
                record("width + refit", target, member, 0, cut_s + time.perf_counter() - t)
    del grams

    # The default recipe, and the width family.
    if "width-kd" in wanted:
        from_disk(args.width_family, "width + refit + KD")
    if "vocab-kd" in wanted:
        from_disk(args.vocab_family, "vocabulary + width + refit + KD")
    if "kd" in wanted:
        kd = args.default_family or args.work / "kd"
        if not args.default_family:
            build_family(BuildConfig(
                parent=parent_dir, targets=targets, calib="parent", out=kd, name="kd",
                heal=HealConfig(tokens=args.heal_tokens, seq_len=256, distill_weight=1.0),  # `family build`'s defaults
                method="whitened", command=command, vocab_size=None,
            ))
        from_disk(kd, "+ KD on parent data (SVD)")

    result = {
        "command": command, "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "parent_perplexity_heldout": parent_ppl, "corpus": {"folder": str(corpus.folder), "tokens": corpus.meta["tokens"],
        "generated_tokens": corpus.meta["generated_tokens"], "seconds_this_run": round(corpus_s, 1)},
        "rows": rows, "complete": True,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print("\n| recipe | target | chat agreement | chat KL | held-out ppl × parent | degenerate | train tokens | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (-r["target"], rows.index(r))):
        print(f"| {r['recipe']} | {r['target']} | {r['chat_agreement']:.3f} | {r['chat_kl']:.3f} | {r['ppl_ratio']:.2f} | "
              f"{r['degenerate']} | {r['train_tokens']} | {r['wall_s']:.0f} |")
    print(f"\nparent held-out perplexity {parent_ppl:.2f}; corpus {corpus.meta['tokens']} tokens "
          f"({corpus.meta['generated_tokens']} generated by the parent); command: {command}")
    if not math.isfinite(parent_ppl):
        raise SystemExit("parent perplexity is not finite")


if __name__ == "__main__":
    main()
