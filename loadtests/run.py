"""Headless load test against a running gateway, through locust's library API (no web UI).

    python -m loadtests.run --gateway http://127.0.0.1:8000 --duration 60 --users 8 \
        --out runs/loadtest/gateway [--policy gateway|parent|static] [--classes classes.json]

Spawns the users of loadtests/locustfile.py for `--duration` seconds, lets requests in flight finish
(bounded by --stop-timeout), and writes into --out: report.json (throughput, TTFT/TPOT/e2e
percentiles and goodput per budget class, members that served), outcomes.jsonl (one line per request),
report.png and report.md.
"""

from __future__ import annotations

# locust patches the standard library with gevent on import: import it before anything that opens sockets.
import locust  # noqa: F401,I001

import argparse
import json
import sys
import time
from pathlib import Path

import gevent
from locust.env import Environment

from loadtests import locustfile
from loadtests.budgets import POLICIES, ClassSpec, Figures, classes_json, derive_classes, load_classes
from loadtests.report import markdown_table, plot, summarize, write_outcomes


def warm_up(gateway: str, fig: Figures, n: int = 1, timeout: float = 120.0) -> None:
    """One short request per member, so model loading and first-call costs stay out of the figures."""
    import requests

    for m in fig.registry.members:
        for _ in range(n):
            try:
                requests.post(f"{gateway}/v1/completions", json={"model": m.name, "prompt": "Hello", "max_tokens": 4},
                              timeout=timeout)
            except requests.RequestException:
                pass


def run_scenario(gateway: str, policy: str, *, duration: float, users: int, spawn_rate: float | None = None,
                 figures: Figures | None = None, classes: list[ClassSpec] | None = None, seed: int = 0,
                 stop_timeout: float = 60.0, request_timeout: float = 120.0, api_key: str | None = None,
                 rate_per_user: float = 0.5) -> tuple[list, float, dict]:
    """Run one policy for `duration` seconds; return (outcomes, elapsed seconds, locust's own stats)."""
    gateway = gateway.rstrip("/")
    figures = figures or Figures.from_gateway(gateway, api_key=api_key)
    classes = classes or derive_classes(figures)
    sc = locustfile.Scenario(gateway, policy, figures, classes, seed=seed, timeout=request_timeout, api_key=api_key,
                             rate_per_user=rate_per_user)
    locustfile._USER_IDS = __import__("itertools").count()  # same users, same draws, for every policy
    locustfile.configure(sc)
    by_name = {c.name: c for c in classes}
    user_classes = []
    for uc in locustfile.USER_CLASSES:
        if uc.budget_class in by_name:
            uc.weight = by_name[uc.budget_class].weight
            user_classes.append(uc)
    outcomes = []

    def collect(outcome, **_kw):
        outcomes.append(outcome)

    env = Environment(user_classes=user_classes, host=gateway, stop_timeout=stop_timeout)
    locustfile.family_request.add_listener(collect)
    try:
        runner = env.create_local_runner()
        start = time.perf_counter()
        sc.t0 = start
        runner.start(users, spawn_rate=spawn_rate or users)
        gevent.sleep(duration)
        runner.stop()  # users finish the request in hand (bounded by stop_timeout), then stop
        runner.quit()
        elapsed = time.perf_counter() - start
        stats = {
            f"{e.method} {e.name}": {"num_requests": e.num_requests, "num_failures": e.num_failures,
                                     "median_ms": e.median_response_time, "p95_ms": e.get_response_time_percentile(0.95)}
            for e in env.stats.entries.values()
        }
    finally:
        locustfile.family_request.remove_listener(collect)
    return outcomes, elapsed, stats


def write_report(out: Path, policy: str, outcomes: list, elapsed: float, meta: dict, locust_stats: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(outcomes, elapsed, {"policy": policy, **meta})
    summary["locust_stats"] = locust_stats
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_outcomes(outcomes, out / "outcomes.jsonl")
    (out / "report.md").write_text(markdown_table({policy: summary}))
    plot({policy: summary}, out / "report.png", title=f"{policy}: {meta.get('users')} users, {meta.get('duration_s')} s")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", default="http://127.0.0.1:8000")
    ap.add_argument("--policy", choices=POLICIES, default="gateway")
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--spawn-rate", type=float, default=None)
    ap.add_argument("--rate-per-user", type=float, default=0.5, help="requests per second each user starts (paced)")
    ap.add_argument("--classes", type=Path, help="JSON budget classes (default: derived from the family's figures)")
    ap.add_argument("--latency-slack", type=float, default=2.0)
    ap.add_argument("--device-class", default=None, help="default: the fleet's, from /v1/family")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs/loadtest/run"))
    args = ap.parse_args(argv)

    fig = Figures.from_gateway(args.gateway, args.device_class, args.api_key)
    classes = load_classes(args.classes) if args.classes else derive_classes(fig, latency_slack=args.latency_slack)
    if not args.no_warmup:
        warm_up(args.gateway, fig)
    outcomes, elapsed, stats = run_scenario(args.gateway, args.policy, duration=args.duration, users=args.users,
                                            spawn_rate=args.spawn_rate, figures=fig, classes=classes, seed=args.seed,
                                            api_key=args.api_key, rate_per_user=args.rate_per_user)
    meta = {"gateway": args.gateway, "users": args.users, "rate_per_user": args.rate_per_user, "duration_s": args.duration, "device_class": fig.device_class,
            "family": fig.family, "classes": classes_json(classes)}
    s = write_report(args.out, args.policy, outcomes, elapsed, meta, stats)
    o = s["overall"]
    print(f"{args.policy}: {o['requests']} requests, goodput {o['goodput']}, {o['throughput_rps']} req/s, "
          f"failed {o['failed']}, 5xx {o['server_5xx']} -> {args.out}/report.json")
    return 0 if o["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
