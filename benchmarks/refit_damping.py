"""How close to the parent is a width-pruned member before distillation, and what does the refit add?

The parent's vocabulary is trimmed to V tokens as `family build` trims it (the ones it uses most on
its corpus; `--select first`: the BPE's first V, as before 2026-12-07; plrd/vocab.py), every MLP pruned to W
neurons (plrd/width.py, the calibration Grams of the trimmed parent on its own corpus, re-encoded),
then each row: the pruned member as it is, and after `sequential_refit` (plrd/refit.py) at each
damping, and with `--refine EPOCHS:LR,...` also after the refit followed, block by block, by that many
Adam epochs of its per-block refinement toward the parent's block outputs (`refine_epochs`,
`refine_lr`). No distillation, so the rows measure the cut and the refit alone. Scored as `family eval`
scores a trimmed member: held-out chat agreement and KL in the member's tokens against the folded
parent, its own greedy answers checked for degeneracy, held-out text perplexity per parent token
over the parent's.

    python benchmarks/refit_damping.py --vocab-size 24576 --widths 1290,1031 --dampings 0.01,0.1,0.3
    python benchmarks/refit_damping.py --widths 1290 --dampings 0.1 --refine 2:1e-4,2:1e-3
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import family  # noqa: F401
from family import chat_eval, defaults
from family.accuracy import evaluate, perplexity_in_parent_tokens, windows
from family.data import read_prompts
from family.vocab_map import VocabMap
from plrd.calibrate import collect_grams
from plrd.corpus import CorpusConfig, make_corpus
from family.text import pack, read_source, tokenize
from plrd.factorize import count_parameters
from plrd.parent import load_parent
from plrd.refit import sequential_refit
from plrd.vocab import first_ids, most_used_vocabulary, reencode, trim_model, trim_tokenizer
from plrd.width import parent_neurons, prune_width, refit_rows

import tables  # benchmarks/tables.py


def _floats(text: str, what: str, ap: argparse.ArgumentParser, kind=float) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"{what}: give numbers separated by commas, got {text!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", default=str(defaults.DEFAULT_PARENT_DIR))
    ap.add_argument("--vocab-size", type=int, default=defaults.VOCAB_SIZE)
    ap.add_argument("--select", choices=("usage", "first"), default="usage", help="which V tokens: the parent's most used (family build's), or the BPE's first")
    ap.add_argument("--widths", default="1290,1031", help="MLP widths to prune to")
    ap.add_argument("--dampings", default="0.01,0.1,0.3", help="refit dampings (relative to the Gram's mean diagonal)")
    ap.add_argument("--refine", default="", help="per-block refinements after the refit, as EPOCHS:LR pairs separated by commas")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    widths = _floats(args.widths, "--widths", ap, int)
    dampings = _floats(args.dampings, "--dampings", ap)
    try:
        refines = [(0, 0.0)] + [(int(e), float(lr)) for e, lr in (x.split(":") for x in args.refine.split(",") if x.strip())]
    except ValueError:
        ap.error(f"--refine: give EPOCHS:LR pairs separated by commas, got {args.refine!r}")
    parent, tok = load_parent(Path(args.parent))
    if not 0 < args.vocab_size <= parent.config.vocab_size or any(not 0 < w <= parent.config.intermediate_size for w in widths):
        ap.error(f"--vocab-size up to {parent.config.vocab_size}, --widths up to {parent.config.intermediate_size}")
    P = count_parameters(parent)
    # The data `family build` calibrates on: the parent's own corpus (cached), in the member's tokens.
    corpus = make_corpus(parent, tok, Path(args.parent), defaults.RUNS_DIR, CorpusConfig())
    sequences = [r["ids"] for r in corpus.records]
    if args.select == "usage":
        member_tok = most_used_vocabulary(parent, tok, sequences, args.vocab_size, seq_len=defaults.HEAL_SEQ_LEN)
    else:
        member_tok = trim_tokenizer(tok, first_ids(args.vocab_size))
    vocab = VocabMap.between(tok, member_tok)
    base = trim_model(copy.deepcopy(parent), vocab.to_parent.tolist()).eval()
    ids = torch.tensor([t for s in reencode(sequences, tok, member_tok) for t in s])
    calib = pack(ids, defaults.CALIB_SEQ_LEN, defaults.CALIB_SEQUENCES, seed=0)
    grams = collect_grams(base, calib)

    prompts = [p.prompt for p in read_prompts(defaults.EVAL_PROMPTS)]
    ref = chat_eval.reference(parent, tok, prompts)
    text_ids = tokenize(tok, read_source(str(defaults.EVAL_TEXT)).text)
    rows = windows(text_ids, defaults.EVAL_SEQ_LEN, defaults.EVAL_WINDOWS)
    parent_ppl = evaluate({"parent": parent}, None, text_ids, seq_len=defaults.EVAL_SEQ_LEN, max_windows=defaults.EVAL_WINDOWS)["parent"].perplexity

    results = []

    def measure(width: int, step: str, model, seconds: float) -> None:
        chat = chat_eval.score_member(model, parent, tok, member_tok, ref, progress=False)
        ppl = perplexity_in_parent_tokens(model, member_tok, tok, rows, progress=False).perplexity
        row = {"vocab": args.vocab_size, "select": args.select, "width": width, "step": step, "params": count_parameters(model) / P,
               "chat_agreement": chat.agreement, "chat_kl": chat.kl, "degenerate": round(chat.degenerate_share * len(prompts)),
               "prompts": len(prompts), "ppl_ratio": ppl / parent_ppl, "seconds": round(seconds, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)

    for width in widths:
        pruned, neurons = prune_width(base, width, grams, parent_neurons(base))
        measure(width, "pruned", pruned, 0.0)
        for damping in dampings:
            for epochs, lr in refines:
                member = copy.deepcopy(pruned)
                t0 = time.perf_counter()
                sequential_refit(parent, member, calib, output_rows=refit_rows(neurons), damping=damping, vocab=vocab,
                                 refine_epochs=epochs, refine_lr=lr)
                step = f"refit δ={damping:g}" + (f" + refine {epochs} epochs at lr {lr:g}" if epochs else "")
                measure(width, step, member, time.perf_counter() - t0)

    print(f"\n{tables.command()}")
    print(tables.markdown(results, [
        ("vocab", lambda r: r["vocab"]), ("MLP width", lambda r: r["width"]), ("params", lambda r: f"{r['params']:.3f}"),
        ("step", lambda r: r["step"]), ("chat agree", lambda r: f"{r['chat_agreement']:.3f}"), ("chat KL", lambda r: f"{r['chat_kl']:.3f}"),
        ("degenerate", lambda r: f"{r['degenerate']}/{r['prompts']}"), ("ppl / parent", lambda r: f"{r['ppl_ratio']:.2f}"),
        ("refit s", lambda r: r["seconds"])]))
    tables.save_json(args.json, {"command": tables.command(), "rows": results}, indent=2)


if __name__ == "__main__":
    main()
