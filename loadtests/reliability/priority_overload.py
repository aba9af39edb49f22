"""priority-overload: more traffic than the parent's worker can take, critical and sheddable mixed
(issue 12). The same load runs twice, side by side in one run: first with every request `standard`
(no priorities: a FIFO queue at the gateway), then with the critical callers marked `critical` and the
others `sheddable`.

Critical requests need the parent (`min_accuracy` only the parent meets) within a latency limit of
`budget_factor` times the parent's own unloaded latency, measured at the start of the run; sheddable
requests have no budget (they want the best member too). The gateway gives each worker
`worker_slots` slots, so the parent is saturated. What must hold, with priorities:

- critical goodput (200, within its latency limit, served by the parent) ≥ `min_critical_goodput`;
- sheddable traffic is downshifted (served by a smaller member) or shed (429), not left to queue;
- no request simply times out: every answer is a 200, or a 429/503 with Retry-After, and no client
  saw a timeout or a broken connection; every stream ends with [DONE].
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import httpx

from loadtests.harness import ProcessFleet, WorkerConf
from loadtests.reliability.common import Load, Result, finish, names


def _counter(url: str, prefix: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _phase(url: str, critical: dict, sheddable: dict, phase_s: float, critical_threads: int, sheddable_threads: int,
           timeout: float) -> tuple[list[Result], list[Result]]:
    crit = Load(url, critical, threads=critical_threads, max_s=phase_s, max_requests=10_000, timeout=timeout).start()
    shed = Load(url, sheddable, threads=sheddable_threads, max_s=phase_s, max_requests=10_000, timeout=timeout).start()
    return crit.join(), shed.join()


def _explicit(r: Result) -> bool:
    """An answer, not a timeout: a clean 200, or a 429/503 with Retry-After."""
    if r.exception is not None:
        return False
    if r.status == 200:
        return not r.stream or (r.done and not r.error_event)
    return r.status in (429, 503) and bool(r.retry_after)


def _figures(crit: list[Result], shed: list[Result], parent: str, limit_s: float) -> dict:
    met = [r for r in crit if r.status == 200 and r.exception is None and (not r.stream or r.done) and r.member == parent and r.e2e_s <= limit_s]
    e2e = sorted(r.e2e_s for r in crit if r.status == 200)
    return {
        "critical": {"requests": len(crit), "goodput": round(len(met) / max(1, len(crit)), 4),
                     "status": dict(Counter(str(r.status) for r in crit)), "served_by": dict(Counter(r.member or "-" for r in crit)),
                     "e2e_p50_ms": round(statistics.median(e2e) * 1e3, 1) if e2e else None,
                     "e2e_max_ms": round(e2e[-1] * 1e3, 1) if e2e else None},
        "sheddable": {"requests": len(shed), "status": dict(Counter(str(r.status) for r in shed)),
                      "served_by": dict(Counter(r.member or "-" for r in shed)),
                      "served_by_parent": sum(r.status == 200 and r.member == parent for r in shed),
                      "downshifted_or_smaller": sum(r.status == 200 and r.member != parent for r in shed),
                      "shed_429": sum(r.status == 429 for r in shed)},
        "not_explicit": [{"status": r.status, "exception": r.exception, "stream": r.stream, "done": r.done}
                         for r in crit + shed if not _explicit(r)][:5],
    }


def priority_overload(family_dir: Path, device_class: str, out: Path, *, fleet: ProcessFleet | None = None, phase_s: float = 20,
                      critical_threads: int = 2, sheddable_threads: int = 6, worker_slots: int = 3, budget_factor: float = 8.0,
                      max_tokens: int = 16, min_critical_goodput: float = 0.95, timeout: float = 60.0) -> dict:
    family_dir = Path(family_dir)
    fname, parent, others = names(family_dir)
    own = fleet is None
    if own:
        fleet = ProcessFleet(family_dir, [WorkerConf(parent), *[WorkerConf(m) for m in others]], device_class,
                             out / "priority-overload-logs", health_interval=0.5,
                             gateway_args=["--worker-slots", str(worker_slots), "--max-queue-wait", "10"]).start()
    try:
        base = {"model": fname, "prompt": "The history of the city", "max_tokens": max_tokens, "ignore_eos": True}
        # The parent's unloaded latency, measured now on this machine: the critical budget is a multiple of it.
        warm = Load(fleet.url, {**base, "model": parent}, threads=1, max_s=10, max_requests=10, stream_every=10**6).start().join()
        unloaded_s = statistics.median(r.e2e_s for r in warm[2:] or warm)
        limit_ms = round(budget_factor * unloaded_s * 1e3, 1)
        accuracy = _parent_only_floor(family_dir, parent, others)
        critical = {**base, "budget": {"min_accuracy": accuracy, "max_latency_ms": limit_ms}}
        sheddable = dict(base)
        phases = {}
        for name, (pc, ps) in {"no_priorities": ("standard", "standard"), "priorities": ("critical", "sheddable")}.items():
            downshifts, sheds = _counter(fleet.url, "family_downshifts_total"), _counter(fleet.url, "family_sheds_total")
            crit, shed = _phase(fleet.url, {**critical, "priority": pc}, {**sheddable, "priority": ps}, phase_s, critical_threads,
                                sheddable_threads, timeout)
            phases[name] = _figures(crit, shed, parent, limit_ms / 1e3)
            phases[name]["downshifts"] = _counter(fleet.url, "family_downshifts_total") - downshifts
            phases[name]["sheds"] = _counter(fleet.url, "family_sheds_total") - sheds
            phases[name]["all_explicit"] = all(_explicit(r) for r in crit + shed)
        p = phases["priorities"]
        checks = {
            "critical_goodput_at_least_95pct": p["critical"]["goodput"] >= min_critical_goodput and p["critical"]["requests"] > 0,
            "sheddable_downshifted_or_shed": p["downshifts"] + p["sheds"] > 0
                                             and p["sheddable"]["downshifted_or_smaller"] + p["sheddable"]["shed_429"] > 0,
            "no_request_simply_times_out": p["all_explicit"] and phases["no_priorities"]["all_explicit"],
        }
        return finish("priority-overload", checks, unloaded_parent_ms=round(unloaded_s * 1e3, 1),
                      critical_budget={"min_accuracy": accuracy, "max_latency_ms": limit_ms}, worker_slots=worker_slots,
                      callers={"critical": critical_threads, "sheddable": sheddable_threads}, phase_s=phase_s, phases=phases)
    finally:
        if own:
            fleet.stop()


def _parent_only_floor(family_dir: Path, parent: str, others: list[str]) -> float:
    """An accuracy floor between the parent and the best other member: only the parent meets it."""
    from family.registry import load_family

    q = {m.name: m.quality for m in load_family(family_dir, verify="none").registry.members}
    top = q.get(parent) if q.get(parent) is not None else 1.0
    below = [q[m] for m in others if q.get(m) is not None]
    return round((top + max(below)) / 2, 4) if below else top
