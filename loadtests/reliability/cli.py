"""The command line: `python -m loadtests.reliability SCENARIO|all --family DIR [--out DIR]`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loadtests import reliability
from loadtests.reliability import (SCENARIOS, corrupt_member, full_queue, fuzz, hostile_input, kill_worker, priority_overload,
                                   redis_down, slow_worker, stalled_worker)


def run(name: str, args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if name == "kill-worker":
        res = kill_worker(args.family, args.device_class, out)
    elif name == "slow-worker":
        res = slow_worker(args.family, args.device_class, out)
    elif name == "full-queue":
        res = full_queue(args.family, args.device_class, out)
    elif name == "fuzz":
        res = fuzz(args.family, args.device_class, out, gateway=args.gateway, max_examples=args.max_examples, max_time_s=args.max_time)
    elif name == "corrupt-member":
        res = corrupt_member(args.family, args.device_class, out)
    elif name == "hostile-input":
        res = hostile_input(args.family, args.device_class, out, phase_s=args.phase_s)
    elif name == "redis-down":
        res = redis_down(args.family, args.device_class, out)
    elif name == "priority-overload":
        res = priority_overload(args.family, args.device_class, out, phase_s=args.phase_s)
    elif name == "stalled-worker":
        res = stalled_worker(args.family, args.device_class, out)
    else:
        raise SystemExit(f"unknown scenario {name!r}")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"{name}: {'PASS' if res['ok'] else 'FAIL'} " + ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in res["checks"].items()))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=reliability.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=[*SCENARIOS, "all"])
    ap.add_argument("--family", type=Path, required=True)
    ap.add_argument("--device-class", default="cpu-2core")
    ap.add_argument("--out", type=Path, default=Path("runs/reliability"))
    ap.add_argument("--gateway", default=None, help="fuzz: an already running gateway instead of starting one")
    ap.add_argument("--max-examples", type=int, default=15)
    ap.add_argument("--max-time", type=int, default=90)
    ap.add_argument("--phase-s", type=float, default=20, help="hostile-input: seconds of normal traffic alone, then under attack")
    args = ap.parse_args(argv)
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    results = [run(n, args) for n in names]
    return 0 if all(r["ok"] for r in results) else 1
