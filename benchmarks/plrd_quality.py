"""PLRD quality on SmolLM2-135M: WikiText-2 test perplexity of the parent and of members at several
parameter fractions, for plain SVD, whitened SVD, whitened SVD + healing, and TRAWL.

    python benchmarks/plrd_quality.py --parent runs/parent-smollm2-135m --heal-tokens 100000 \
        --json runs/bench/plrd_quality.json

Calibration and healing read valid.txt only; perplexity reads test.txt only (first --windows windows
of 512 tokens, as in DESIGN.md). Healed members are progressive: each is cut from the previous healed
one, exactly as `family build` does.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import family  # noqa: F401  (registers the low-rank architecture)
from family import defaults
from family.accuracy import perplexity
from plrd.calibrate import collect_grams
from plrd.data import pack, read_source, tokenize
from plrd.factorize import count_parameters, factorize
from plrd.heal import HealConfig, heal
from plrd.parent import load_parent
from plrd.trawl import TrawlConfig, parse_layers, parse_modules, trawl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", default=str(defaults.DEFAULT_PARENT_DIR))
    ap.add_argument("--targets", default="0.9,0.8,0.7")
    ap.add_argument("--windows", type=int, default=defaults.EVAL_WINDOWS)
    ap.add_argument("--calib-sequences", type=int, default=32)
    ap.add_argument("--heal-tokens", type=int, default=100_000, help="healing tokens per member")
    ap.add_argument("--heal-seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--trawl-layers", default="last:4")
    ap.add_argument("--trawl-rank", type=int, default=288)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    command = shlex.join([sys.executable.split("/")[-1], *sys.argv])
    targets = [float(t) for t in args.targets.split(",")]

    parent, tok = load_parent(args.parent)
    P = count_parameters(parent)
    test_ids = tokenize(tok, read_source(defaults.EVAL_TEXT).text)
    valid_ids = tokenize(tok, read_source(defaults.CALIB_TEXT).text)
    calib = pack(valid_ids, 512, args.calib_sequences, seed=0)
    heal_rows = pack(valid_ids, args.heal_seq_len)
    heal_rows = heal_rows[torch.randperm(len(heal_rows), generator=torch.Generator().manual_seed(0))]

    def ppl(model) -> float:
        return perplexity(model, test_ids, seq_len=512, max_windows=args.windows)

    rows: list[dict] = []

    def record(method: str, target: float | None, model, extra: dict | None = None) -> None:
        row = {"method": method, "target": target, "params_fraction": count_parameters(model) / P, "perplexity": ppl(model), **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)

    t0 = time.perf_counter()
    record("parent", 1.0, parent)
    grams = collect_grams(parent, calib)
    for target in targets:
        record("plain SVD (uniform rank)", target, factorize(parent, target, P, grams=None, allocation="uniform"))
        record("whitened SVD (uniform rank)", target, factorize(parent, target, P, grams=grams, allocation="uniform"))
        record("whitened SVD (allocated rank)", target, factorize(parent, target, P, grams=grams, allocation="allocated"))

    # Progressive: factorize → heal → factorize the healed member at the next target → heal …
    current = parent
    for target in targets:
        g = grams if current is parent else collect_grams(current, calib)
        member = factorize(current, target, P, grams=g, allocation="allocated")
        result = heal(member, heal_rows, HealConfig(tokens=args.heal_tokens, seq_len=args.heal_seq_len, lr=args.lr))
        record(
            f"whitened SVD + healing ({args.heal_tokens // 1000}k tokens/member, progressive)", target, member,
            {"heal_tok_s": round(result.tokens / result.seconds, 1), "heal_final_loss": round(result.final_loss, 4)},
        )
        current = member

    for rank in (args.trawl_rank, args.trawl_rank // 2):
        model, _ = load_parent(args.parent)
        cfg = TrawlConfig("tucker", rank=(rank,), strategy="cross-layer", modules=parse_modules("mlp"),
                          layers=parse_layers(args.trawl_layers, model.config.num_hidden_layers), mode="denoise")
        record(f"TRAWL Tucker denoise (MLP, {args.trawl_layers} layers, rank {rank})", None, trawl(model, cfg)[0])
        model, _ = load_parent(args.parent)
        record(f"TRAWL Tucker compress (MLP, {args.trawl_layers} layers, rank {rank})", None, trawl(model, cfg.__class__(**{**cfg.__dict__, "mode": "compress"}))[0])

    print(f"\n{command}\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {time.perf_counter() - t0:.0f} s\n")
    print("| method | target | params (× parent) | WikiText-2 test ppl |")
    print("|---|---|---|---|")
    for r in rows:
        target = "" if r["target"] is None else f"{r['target']:.2f}"
        print(f"| {r['method']} | {target} | {r['params_fraction']:.3f} | {r['perplexity']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
