"""How faithful is a model whose vocabulary is cut to V tokens (plrd/vocab.py)?

Which V tokens (`--select`): `usage`, the ones the parent puts most probability on over its own
corpus, closed under BPE merges (what `family build` keeps); `first`, the BPE's first V ids (its
first merges; the default before 2026-12-07). No training: the model keeps those rows of its tied
embedding / LM head and the tokenizer keeps the merges that make them. Measured as `family eval` measures members,
with the parent's held-out greedy answers re-encoded in the trimmed tokenizer's ids:
- chat agreement: the share of those tokens that are the model's argmax;
- chat KL: KL(parent ‖ model), the parent's distribution summed onto the ids the model can say (a
  removed token counts for the piece its spelling starts with);
- degenerate: the model's own greedy answers through the trimmed tokenizer;
- ppl/char × parent: held-out text perplexity per character (a trimmed tokenizer spends more tokens
  on the same text, so per-token perplexities are not comparable), over the parent's;
- tokens ×: how many more tokens the held-out text takes.
At the full vocabulary, two rows: the untrimmed model scored as `family eval` scores it, and scored on
the re-encoded answers ("re-encoded"): what re-encoding alone costs (a generated token sequence is not
always the canonical encoding of its text).

    python benchmarks/vocab_trim.py --sizes 49152,32768,24576,16384 --select first,usage
    python benchmarks/vocab_trim.py --models runs/family-smollm2-135m/smollm2-135m-p90 --sizes 49152,32768,24576
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import family  # noqa: F401
from family import chat_eval, defaults
from family.accuracy import perplexity
from family.data import read_prompts
from family.text import pack, read_source, tokenize
from plrd.factorize import count_parameters
from plrd.parent import load_parent
from family.vocab_map import VocabMap
from plrd.corpus import CorpusConfig, make_corpus
from plrd.vocab import choose_vocabulary, first_ids, token_usage, trim_model, trim_tokenizer

import tables  # benchmarks/tables.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", default=str(defaults.DEFAULT_PARENT_DIR))
    ap.add_argument("--models", default="", help="comma-separated model folders to trim (default: the parent)")
    ap.add_argument("--sizes", default="49152,32768,24576,16384", help="vocabulary sizes to keep")
    ap.add_argument("--select", default="usage", help="comma-separated: usage (the parent's most used tokens), first (the BPE's first ids)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes: give whole numbers separated by commas, got {args.sizes!r}")
    selects = [x for x in args.select.split(",") if x]
    if not selects or set(selects) - {"usage", "first"}:
        ap.error(f"--select: usage and/or first, got {args.select!r}")
    if missing := [m for m in args.models.split(",") if m and not (Path(m) / "config.json").is_file()]:
        ap.error(f"--models: no model folder at {', '.join(missing)}")
    parent, tok = load_parent(Path(args.parent))
    P = count_parameters(parent)
    if bad := [size for size in sizes if size <= max(tok.all_special_ids) or size > parent.config.vocab_size]:
        ap.error(f"--sizes: {bad} outside {max(tok.all_special_ids) + 1}..{parent.config.vocab_size} (past the specials, up to the parent's vocabulary)")
    prompts = [p.prompt for p in read_prompts(defaults.EVAL_PROMPTS)]
    ref = chat_eval.reference(parent, tok, prompts)
    text = read_source(defaults.EVAL_TEXT).text

    def nll_per_char(model, tokenizer) -> tuple[float, int]:
        ids = tokenize(tokenizer, text)
        return math.log(perplexity(model, ids, 512, None, progress=False)) * (len(ids) - math.ceil(len(ids) / 512)) / len(text), len(ids)

    parent_nll, parent_tokens = nll_per_char(parent, tok)
    if "usage" in selects:  # the parent's expected token counts on its own corpus, as `family build` takes them
        corpus = make_corpus(parent, tok, Path(args.parent), defaults.RUNS_DIR, CorpusConfig())
        usage = token_usage(parent, pack(torch.tensor([t for r in corpus.records for t in r["ids"]]), defaults.HEAL_SEQ_LEN))
    rows = []
    for folder, size, select in [(f, size, sel) for f in (args.models.split(",") if args.models else [args.parent]) for size in sizes for sel in selects]:
        model, member_tok = load_parent(Path(folder))
        full = size >= model.config.vocab_size
        if full and select != selects[0]:
            continue  # nothing is trimmed: one row whatever the selection
        if not full:
            keep = choose_vocabulary(tok, usage, size) if select == "usage" else first_ids(size)
            member_tok = trim_tokenizer(tok, keep)
            trim_model(model, keep)
        nll, n = nll_per_char(model, member_tok)
        for reencode in (False, True) if full else (True,):
            if reencode:
                member_ref, vocab = chat_eval.in_tokens_of(ref, tok, member_tok), VocabMap.between(tok, member_tok)
            else:
                member_ref, vocab = ref, None
            c = chat_eval.score(model, parent, member_tok, member_ref, vocab=vocab, progress=False)
            rows.append(row := {
                "model": Path(folder).name, "vocab": f"{size} re-encoded" if full and reencode else size, "select": "-" if full else select,
                "params_fraction": round(count_parameters(model) / P, 4),
                "chat_agreement": round(c.agreement, 4), "chat_kl": round(c.kl, 4),
                "degenerate": f"{round(c.degenerate_share * len(prompts))}/{len(prompts)}",
                "ppl_per_char_ratio": round(math.exp(nll - parent_nll), 3), "tokens_ratio": round(n / parent_tokens, 4),
                "first_answer": c.answers[0][:80]})
            print(json.dumps(row), flush=True)
    print(tables.markdown(rows, [
        ("model", lambda r: r["model"]), ("vocab", lambda r: r["vocab"]), ("kept", lambda r: r["select"]),
        ("params × parent", lambda r: f"{r['params_fraction']:.3f}"), ("chat agreement", lambda r: f"{r['chat_agreement']:.3f}"),
        ("chat KL", lambda r: f"{r['chat_kl']:.3f}"), ("degenerate", lambda r: r["degenerate"]),
        ("ppl/char × parent", lambda r: f"{r['ppl_per_char_ratio']:.2f}"), ("tokens ×", lambda r: f"{r['tokens_ratio']:.3f}")]))
    tables.save_json(args.json, rows)
    print("command:", tables.command())


if __name__ == "__main__":
    main()
