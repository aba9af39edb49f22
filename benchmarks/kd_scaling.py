"""What budget would close the faithfulness gap? One member, distilled from the parent in segments,
measured after each (issue 10: "say what budget would close it").

The member is cut from the parent at `--target` (`--method whitened`: whitened SVD on the parent's
corpus, ranks by `--allocation`; `--method width`, `family build`'s default: every MLP narrowed to its
highest-scoring neurons, plrd/width.py), refit to the parent layer by layer (plrd/refit.py), measured, then distilled from the
parent on its corpus (`family build`'s KD defaults) segment by segment: after each cumulative budget in
`--budgets` it is measured again as `family eval` measures members (chat agreement and KL on the
held-out chat prompts, degenerate greedy answers, held-out text perplexity relative to the parent).
Each segment is its own warm-up + cosine schedule (a warm restart), so a row at N tokens is what
segments summing to N give, close to but not the same as one run of N tokens.

    python benchmarks/kd_scaling.py --parent runs/parent-smollm2-135m --target 0.9 \
        --budgets 20000,60000,140000 --json runs/bench/kd_scaling-0.9.json
    python benchmarks/kd_scaling.py --method width --target 0.9 --budgets 20000,60000,140000 \
        --json runs/bench/kd_scaling-width-0.9.json

With `--allocation both` the refit start is measured for `allocated` and `sensitivity` ranks side by
side, and the better start is distilled.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import family  # noqa: F401  (registers the low-rank architecture)
from family import chat_eval, defaults
from family.accuracy import perplexity
from family.data import SEED_PROMPTS, read_prompts
from family.generate import chat_prompt_ids
from plrd.calibrate import collect_grams
from plrd.corpus import CorpusConfig, make_corpus
from family.text import pack, read_source, tokenize
from plrd.factorize import count_parameters, factorize, spectra
from plrd.heal import HealConfig, heal
from plrd.onpolicy import OnPolicyConfig, distill_on_policy
from plrd.parent import load_parent
from plrd.refit import sequential_refit
from plrd.sensitivity import output_sensitivity
from plrd.width import parent_neurons, prune_width, refit_rows, width_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", default=str(defaults.DEFAULT_PARENT_DIR))
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--method", default="whitened", choices=["whitened", "width"], help="how the member is cut")
    ap.add_argument("--allocation", default="allocated", choices=["allocated", "sensitivity", "uniform", "both"])
    ap.add_argument("--budgets", default="20000,60000,140000", help="cumulative distillation tokens at which to measure")
    ap.add_argument("--lr", type=float, default=HealConfig(tokens=0).lr)
    ap.add_argument("--train", default=HealConfig(tokens=0).train, choices=["factors", "blocks", "all"])
    ap.add_argument("--hidden-weight", type=float, default=0.0)
    ap.add_argument("--corpus-samples", type=int, default=CorpusConfig().samples_per_prompt)
    ap.add_argument("--on-policy-after", type=int, default=None,
                    help="segments ending past this many tokens distil on the member's own answers (plrd/onpolicy.py), not the parent's corpus")
    ap.add_argument("--rollout-temperature", type=float, default=OnPolicyConfig(tokens=0).temperature)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    command = shlex.join(["python", *sys.argv])
    budgets = [int(b) for b in args.budgets.split(",")]
    if any(b <= a for a, b in zip([0, *budgets], budgets)):
        raise SystemExit("--budgets must be increasing positive token counts")

    parent_dir = Path(args.parent)
    parent, tok = load_parent(parent_dir)
    P = count_parameters(parent)
    corpus = make_corpus(parent, tok, parent_dir, defaults.RUNS_DIR, CorpusConfig(samples_per_prompt=args.corpus_samples))
    ids = corpus.token_ids()
    calib = pack(ids, 256, 64, seed=0)
    heal_cfg = HealConfig(tokens=0, distill_weight=1.0, lr=args.lr, train=args.train, hidden_weight=args.hidden_weight)
    rows_all = pack(ids, heal_cfg.seq_len)
    rows_all = rows_all[torch.randperm(len(rows_all), generator=torch.Generator().manual_seed(0))]
    prompts = [p.prompt for p in read_prompts(defaults.EVAL_PROMPTS)]
    ref = chat_eval.reference(parent, tok, prompts)
    held_ids = tokenize(tok, read_source(defaults.EVAL_TEXT).text)
    parent_ppl = perplexity(parent, held_ids, 512, None, progress=False)
    rows: list[dict] = []

    def record(label: str, model, tokens: int, wall_s: float) -> float:
        c = chat_eval.score(model, parent, tok, ref, name=label)
        ppl = perplexity(model, held_ids, 512, None, progress=False)
        row = {"start": label, "kd_tokens": tokens, "params_fraction": round(count_parameters(model) / P, 4),
               "chat_agreement": round(c.agreement, 4), "chat_kl": round(c.kl, 4), "ppl_ratio": round(ppl / parent_ppl, 3),
               "degenerate": f"{round(c.degenerate_share * len(prompts))}/{len(prompts)}", "wall_s": round(wall_s, 1),
               "first_answer": c.answers[0][:100]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"command": command, "rows": rows, "complete": False}, indent=2))
        return c.agreement

    grams = collect_grams(parent, calib)
    starts = []  # (chat agreement, label, refit member) per start; the best is distilled
    if args.method == "width":
        t = time.perf_counter()
        member, neurons = prune_width(parent, width_for(parent, args.target, P), grams, parent_neurons(parent))
        sequential_refit(parent, member, calib, output_rows=refit_rows(neurons))
        starts.append((record("refit, width", member, 0, time.perf_counter() - t), "refit, width", member))
    else:
        specs = spectra(parent, grams)
        for allocation in ["allocated", "sensitivity"] if args.allocation == "both" else [args.allocation]:
            t = time.perf_counter()
            sens = output_sensitivity(parent, calib[:16]) if allocation == "sensitivity" else None
            member = factorize(parent, args.target, P, grams=None, specs=specs, allocation=allocation, sensitivity=sens, progress=False)
            sequential_refit(parent, member, calib)
            label = f"refit, {allocation} ranks"
            starts.append((record(label, member, 0, time.perf_counter() - t), label, member))
    del grams
    _, label, member = max(starts, key=lambda s: s[0])

    seed_prompts = [chat_prompt_ids(tok, p.prompt) for p in read_prompts(SEED_PROMPTS)]
    done, wall = 0, 0.0
    for budget in budgets:
        seg = budget - done
        t = time.perf_counter()
        if args.on_policy_after is not None and done >= args.on_policy_after:
            on_cfg = OnPolicyConfig(tokens=seg, temperature=args.rollout_temperature, seed=done)
            distill_on_policy(member, parent, tok, seed_prompts, on_cfg, heal_cfg)
            label = f"{label.split(' +')[0]} + on-policy after {args.on_policy_after}"
        else:
            # A different slice of the (shuffled) corpus per segment, so segments do not repeat the same rows.
            offset = (done // heal_cfg.seq_len) % len(rows_all)
            heal(member, torch.roll(rows_all, -offset, dims=0), replace(heal_cfg, tokens=seg, seed=done), teacher=parent)
        wall += time.perf_counter() - t
        done = budget
        record(label, member, done, wall)

    result = {"command": command, "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "target": args.target, "method": args.method,
              "corpus_tokens": corpus.meta["tokens"], "heal": {"lr": args.lr, "train": args.train, "hidden_weight": args.hidden_weight},
              "on_policy_after": args.on_policy_after, "rollout_temperature": args.rollout_temperature,
              "rows": rows, "complete": True}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"\n| start | KD tokens | chat agreement | chat KL | held-out ppl × parent | degenerate | wall s |   (target {args.target})")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['start']} | {r['kd_tokens']} | {r['chat_agreement']:.3f} | {r['chat_kl']:.3f} | {r['ppl_ratio']:.2f} | {r['degenerate']} | {r['wall_s']:.0f} |")
    print(f"\ncorpus {corpus.meta['tokens']} tokens; command: {command}")


if __name__ == "__main__":
    main()
