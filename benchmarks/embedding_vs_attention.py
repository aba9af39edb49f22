"""Is the tied embedding / LM head (21% of SmolLM2-135M) a better place for low rank than attention?

The same number of parameters is removed two ways, with no training, and each result is measured as
`family eval` measures members (chat agreement and KL on the held-out chat prompts, degenerate
answers, held-out text perplexity relative to the parent):
- the embedding matrix E (vocab × hidden, tied to the LM head) replaced by its rank-r truncation,
  weighted by token frequency in the parent's own corpus (frequent tokens kept exact first);
  parameters removed: vocab·hidden − r·(vocab + hidden);
- the attention projections (q, k, v, o of every layer) cut by whitened SVD (calibrated on the same
  corpus, ranks allocated by the spectra, or by output sensitivity with `--allocation sensitivity`)
  until the same number of parameters is removed;
- with `--places ...,all`: every projection (attention and MLP) cut the same way, as `family build`
  cuts a member, without its refit or healing: is attention a better place than everywhere?

    python benchmarks/embedding_vs_attention.py --parent runs/parent-smollm2-135m --ranks 448,384
    python benchmarks/embedding_vs_attention.py --parent runs/parent-smollm2-135m --ranks 288 \
        --places attention,all --allocation sensitivity
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import family  # noqa: F401
from family import chat_eval, defaults
from family.accuracy import perplexity
from family.data import read_prompts
from plrd.calibrate import collect_grams
from plrd.corpus import CorpusConfig, make_corpus
from family.text import pack, read_source, tokenize
from plrd.factorize import build_lowrank, choose_ranks, count_parameters, spectra
from plrd.parent import load_parent
from plrd.sensitivity import output_sensitivity

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", default=str(defaults.DEFAULT_PARENT_DIR))
    ap.add_argument("--ranks", default="448,384", help="embedding ranks to try (hidden size 576): each sets how many parameters are removed")
    ap.add_argument("--places", default="embedding,attention", help="where to remove them: embedding, attention, all (every projection)")
    ap.add_argument("--allocation", choices=("allocated", "sensitivity"), default="allocated", help="rank allocation for attention and all")
    args = ap.parse_args()
    places = args.places.split(",")
    if unknown := sorted(set(places) - {"embedding", "attention", "all"}):
        ap.error(f"--places: unknown {', '.join(unknown)} (give embedding, attention and/or all)")
    parent_dir = Path(args.parent)
    parent, tok = load_parent(parent_dir)
    P = count_parameters(parent)
    corpus = make_corpus(parent, tok, parent_dir, defaults.RUNS_DIR, CorpusConfig())
    ids = corpus.token_ids()
    prompts = [p.prompt for p in read_prompts(defaults.EVAL_PROMPTS)]
    ref = chat_eval.reference(parent, tok, prompts)
    held = tokenize(tok, read_source(defaults.EVAL_TEXT).text)
    parent_ppl = perplexity(parent, held, 512, None, progress=False)
    grams = collect_grams(parent, pack(ids, 256, 64, seed=0))
    every = spectra(parent, grams)
    specs = {"attention": [s for s in every if s.path.rsplit(".", 1)[-1] in ATTENTION], "all": every}
    sensitivity = output_sensitivity(parent, pack(ids, 256, 16, seed=0)) if args.allocation == "sensitivity" else None
    E = parent.model.embed_tokens.weight.detach().double()
    freq = torch.bincount(ids, minlength=E.shape[0]).double()
    w = (freq + 1.0).sqrt()[:, None]  # add-one: unseen tokens still count a little
    U, S, Vh = torch.linalg.svd(w * E, full_matrices=False)

    def measure(what: str, model, removed: int) -> None:
        c = chat_eval.score(model, parent, tok, ref, progress=False)
        ppl = perplexity(model, held, 512, None, progress=False)
        print(json.dumps({"what": what, "params_fraction": round(1 - removed / P, 4), "chat_agreement": round(c.agreement, 4),
                          "chat_kl": round(c.kl, 4), "degenerate": f"{round(c.degenerate_share * len(prompts))}/{len(prompts)}",
                          "ppl_ratio": round(ppl / parent_ppl, 3), "first_answer": c.answers[0][:80]}), flush=True)

    for r in [int(x) for x in args.ranks.split(",")]:
        removed = E.numel() - r * sum(E.shape)
        if "embedding" in places:
            emb = load_parent(parent_dir)[0]
            with torch.no_grad():
                emb.model.embed_tokens.weight.copy_(((U[:, :r] * S[:r]) @ Vh[:r] / w).float())  # tied: the LM head too
            measure(f"embedding rank {r}", emb, removed)
        for place in (p for p in places if p in specs):
            budget = sum(s.dense_cost for s in specs[place]) - removed
            ranks = choose_ranks(specs[place], budget, args.allocation, sensitivity)
            measure(f"{place} ({args.allocation}), same {removed / P:.1%} removed", build_lowrank(parent, specs[place], ranks), removed)
    print("command:", shlex.join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
