"""Does the registry's latency model predict requests it was not fitted on?

Fits the model (family.latency) on a grid of request shapes measured through the serving engine, then
measures held-out shapes (other prompt lengths, output lengths and concurrencies) and compares the
predicted end-to-end time, TTFT and time per token with what was measured. Target: end-to-end within
25% on held-out shapes.

    python benchmarks/latency_model.py --family runs/family-smollm2-135m --member smollm2-135m-p80 --engine torch
    python benchmarks/latency_model.py --family runs/family-smollm2-135m --engine torch --device-class cpu-2core  # registry's model
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from family import defaults, latency
from family.profile import Shape, WorkerProcess, profile_worker
from family.registry import load_family
from family.text import read_source, tokenize

FIT = [Shape(p, 32, c) for c in (1, 4, 8) for p in (32, 256)]
HELD_OUT = [Shape(128, 48, 2), Shape(64, 32, 6), Shape(192, 64, 1), Shape(96, 24, 3), Shape(320, 16, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", type=Path, default=defaults.DEFAULT_FAMILY_DIR)
    ap.add_argument("--member", default=None, help="default: the smallest servable member")
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device-class", default=None,
                    help="validate the registry's own model: fit on the samples of this member's profile for this device "
                         "class (from `family profile`) and measure only the held-out shapes")
    args = ap.parse_args()
    command = shlex.join(["python", *sys.argv])
    fam = load_family(args.family)
    name = args.member or min(fam.servable, key=lambda m: m.parameters).name
    tok = AutoTokenizer.from_pretrained(fam.member_dir(name))
    text_ids = tokenize(tok, read_source(defaults.EVAL_TEXT).text[:300_000]).tolist()
    prof = fam.registry.member(name).latency.get(args.device_class) if args.device_class else None
    if args.device_class and (prof is None or prof.engine != args.engine or len(prof.samples) < 2):
        sys.exit(f"error: {name} has no {args.engine} profile on {args.device_class!r}: run family profile first")
    # The worker as it was profiled (its threads recorded in the profile), or as `family serve` runs it.
    threads = (prof.threads if prof else os.cpu_count()) if args.engine == "torch" else None
    with WorkerProcess(fam.member_dir(name), name, args.engine, threads=threads) as w:
        fit_samples = prof.samples if prof else profile_worker(w.url, name, tok, text_ids, FIT, rounds=args.rounds)
        held = profile_worker(w.url, name, tok, text_ids, HELD_OUT, rounds=args.rounds)
    coef = latency.fit(fit_samples)
    if prof:
        print(f"fitted on the registry's {len(prof.samples)} samples ({prof.command}, measured {prof.measured_at})")
    rows = []
    for s in held:
        pred = latency.predict(coef, s.prompt_tokens, s.output_tokens, s.concurrency)
        rows.append({
            "prompt_tokens": s.prompt_tokens, "output_tokens": s.output_tokens, "concurrency": s.concurrency,
            "measured_ttft_ms": s.ttft_s * 1e3, "predicted_ttft_ms": pred.ttft_s * 1e3,
            "measured_tpot_ms": s.tpot_s * 1e3, "predicted_tpot_ms": pred.tpot_s * 1e3,
            "measured_e2e_ms": s.e2e_s * 1e3, "predicted_e2e_ms": pred.e2e_s * 1e3,
            "e2e_error": pred.e2e_s / s.e2e_s - 1, "ttft_error": pred.ttft_s / s.ttft_s - 1, "tpot_error": pred.tpot_s / s.tpot_s - 1,
        })
    fit_err = latency.fit_error(coef, fit_samples)
    print(f"\n{command}\n{time.strftime('%Y-%m-%d %H:%M')}, member {name}, engine {args.engine}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"fitted on {len(fit_samples)} shapes: " + ", ".join(f"{k}={v:.3g}" for k, v in coef.items()))
    print(f"in-sample error: TTFT {fit_err['ttft']:.0%}, TPOT {fit_err['tpot']:.0%}, e2e {fit_err['e2e']:.0%}\n")
    print("| held-out shape (prompt/output/concurrency) | TTFT ms measured / predicted | TPOT ms measured / predicted "
          "| e2e ms measured / predicted | e2e error |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt_tokens']}/{r['output_tokens']}/{r['concurrency']} | {r['measured_ttft_ms']:.0f} / {r['predicted_ttft_ms']:.0f} "
              f"| {r['measured_tpot_ms']:.1f} / {r['predicted_tpot_ms']:.1f} | {r['measured_e2e_ms']:.0f} / {r['predicted_e2e_ms']:.0f} "
              f"| {r['e2e_error']:+.0%} |")
    within = sum(abs(r["e2e_error"]) <= 0.25 for r in rows)
    print(f"\nheld-out shapes with end-to-end within 25%: {within}/{len(rows)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "member": name, "engine": args.engine, "coefficients": coef,
                                         "fit_error": fit_err, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
