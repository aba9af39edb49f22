"""How faithful is a model whose vocabulary is cut to the BPE's first V tokens (plrd/vocab.py)?

No training: the parent (or a member) keeps the first V rows of its tied embedding / LM head and the
tokenizer keeps its first V − (specials + alphabet) merges. Measured as `family eval` measures members,
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

    python benchmarks/vocab_trim.py --sizes 49152,32768,24576,16384
    python benchmarks/vocab_trim.py --models runs/family-smollm2-135m/smollm2-135m-p90 --sizes 49152,32768,24576
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import family  # noqa: F401
from family import chat_eval, defaults
from family.accuracy import perplexity
from family.data import read_prompts
from plrd.data import read_source, tokenize
from plrd.factorize import count_parameters
from plrd.parent import load_parent
from family.chat_eval import fold_index
from plrd.vocab import trim_model, trim_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", default=str(defaults.DEFAULT_PARENT_DIR))
    ap.add_argument("--models", default="", help="comma-separated model folders to trim (default: the parent)")
    ap.add_argument("--sizes", default="49152,32768,24576,16384", help="vocabulary sizes to keep")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes: give whole numbers separated by commas, got {args.sizes!r}")
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
    rows = []
    for folder in args.models.split(",") if args.models else [args.parent]:
        for size in sizes:
            model, member_tok = load_parent(Path(folder))
            full = size >= model.config.vocab_size
            if not full:
                trim_model(model, size)
                member_tok = trim_tokenizer(member_tok, size)
            nll, n = nll_per_char(model, member_tok)
            for reencode in (False, True) if full else (True,):
                if reencode:
                    member_ref, fold = chat_eval.in_tokens_of(ref, tok, member_tok), fold_index(tok, member_tok)
                else:
                    member_ref, fold = ref, None
                c = chat_eval.score(model, parent, member_tok, member_ref, fold=fold, progress=False)
                rows.append(row := {
                    "model": Path(folder).name, "vocab": f"{size} re-encoded" if full and reencode else size,
                    "params_fraction": round(count_parameters(model) / P, 4),
                    "chat_agreement": round(c.agreement, 4), "chat_kl": round(c.kl, 4),
                    "degenerate": f"{round(c.degenerate_share * len(prompts))}/{len(prompts)}",
                    "ppl_per_char_ratio": round(math.exp(nll - parent_nll), 3), "tokens_ratio": round(n / parent_tokens, 4),
                    "first_answer": c.answers[0][:80]})
                print(json.dumps(row), flush=True)
    print("| model | vocab | params × parent | chat agreement | chat KL | degenerate | ppl/char × parent | tokens × |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['vocab']} | {r['params_fraction']:.3f} | {r['chat_agreement']:.3f} | {r['chat_kl']:.3f} | "
              f"{r['degenerate']} | {r['ppl_per_char_ratio']:.2f} | {r['tokens_ratio']:.3f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print("command:", shlex.join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
