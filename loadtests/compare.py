"""The gateway against two baselines, on the same fleet, at the same load, back to back.

    python -m loadtests.compare --family runs/family-smollm2-135m --duration 60 --users 8 \
        --out runs/loadtest/compare [--gateway URL] [--device-class cpu-2core]

Policies (same users, same budget classes, same prompts and seeds):
- gateway: `model` is the family name and the budget goes in the request; the gateway routes.
- parent: every request pinned to the parent member (no budget sent): the "one big model" baseline.
- static: a client-side static table: for each request the member that the registry's figures alone
  (memory, accuracy, latency predicted at a load of one) pick for its budget, pinned by name.

Without --gateway it starts `family serve --family DIR` (one local worker per member) and stops it
afterwards. Writes compare.json, compare.png, compare.md and one folder per policy (outcomes).
"""

from __future__ import annotations

import locust  # noqa: F401,I001  (gevent monkey-patching first)

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import gevent

from loadtests.budgets import POLICIES, Figures, classes_json, derive_classes, goodput_at_mix, load_classes, verdict
from loadtests.harness import EmbeddedGateway
from loadtests.report import markdown_table, plot, summarize, write_outcomes
from loadtests.run import run_scenario, warm_up


def compare(gateway: str, out: Path, *, duration: float, users: int, policies=POLICIES, classes=None, figures: Figures | None = None,
            latency_slack: float = 2.0, pause_s: float = 5.0, seed: int = 0, meta: dict | None = None,
            rate_per_user: float = 0.5) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    fig = figures or Figures.from_gateway(gateway)
    classes = classes or derive_classes(fig, latency_slack=latency_slack)
    warm_up(gateway, fig)
    results = {}
    for i, policy in enumerate(policies):
        if i:
            gevent.sleep(pause_s)  # let queues drain
        outcomes, elapsed, stats = run_scenario(gateway, policy, duration=duration, users=users, figures=fig, classes=classes, seed=seed,
                                                rate_per_user=rate_per_user)
        s = summarize(outcomes, elapsed, {"policy": policy})
        s["overall"]["goodput_mix"] = goodput_at_mix(s, classes)
        s["locust_stats"] = stats
        (out / policy).mkdir(exist_ok=True)
        write_outcomes(outcomes, out / policy / "outcomes.jsonl")
        (out / policy / "report.json").write_text(json.dumps(s, indent=2) + "\n")
        results[policy] = s
        o = s["overall"]
        print(f"{policy}: {o['requests']} requests, goodput {o['goodput']} (at the class mix {o['goodput_mix']}), {o['throughput_rps']} req/s, failed {o['failed']}", flush=True)
    v = verdict(results)
    report = {**(meta or {}), "gateway": gateway, "family": fig.family, "device_class": fig.device_class, "users": users,
              "rate_per_user": rate_per_user,
              "duration_s_per_policy": duration, "classes": classes_json(classes), "verdict": v,
              "results": {k: {kk: vv for kk, vv in r.items() if kk != "locust_stats"} for k, r in results.items()}}
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(results)
    budgets = "\n".join(f"- `{c.name}` (weight {c.weight}, streamed {c.stream_share:.0%}): `{json.dumps(c.budget)}`" for c in classes)
    (out / "compare.md").write_text(
        f"### {fig.family} on {fig.device_class}: {users} users at {rate_per_user:g} req/s each, {duration:.0f} s per policy\n\n{table}\nBudget classes:\n{budgets}\n\n"
        f"Verdict: `{json.dumps(v)}`\n")
    plot(results, out / "compare.png", title=f"{fig.family} / {fig.device_class}: {users} users, {duration:.0f} s per policy")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", type=Path, required=True)
    ap.add_argument("--gateway", default=None, help="use this running gateway (serving --family) instead of starting one")
    ap.add_argument("--device-class", default="cpu-2core")
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rate-per-user", type=float, default=0.5, help="requests per second each user starts (paced)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--classes", type=Path, default=None)
    ap.add_argument("--latency-slack", type=float, default=2.0)
    ap.add_argument("--pause", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--require", action="store_true", help="exit 1 unless the gateway beats both baselines with no failures")
    ap.add_argument("--out", type=Path, default=Path("runs/loadtest/compare"))
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    with contextlib.ExitStack() as stack:
        url = args.gateway
        if url is None:
            args.out.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            gw = stack.enter_context(EmbeddedGateway(args.family, args.out / "gateway.log", device_class=args.device_class))
            url = gw.url
            print(f"gateway up at {url} after {time.perf_counter() - t0:.0f} s", flush=True)
        fig = Figures.from_gateway(url, args.device_class)
        classes = load_classes(args.classes) if args.classes else None
        report = compare(url, args.out, duration=args.duration, users=args.users, policies=policies, classes=classes, figures=fig,
                         latency_slack=args.latency_slack, pause_s=args.pause, seed=args.seed,
                         meta={"command": " ".join(["python -m loadtests.compare", *(argv or sys.argv[1:])])},
                         rate_per_user=args.rate_per_user)
    print((args.out / "compare.md").read_text())
    v = report["verdict"]
    if args.require and not (v["gateway_beats_parent"] and v["gateway_beats_static"] and v["no_failures"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
