"""Budget routing: the most accurate member that fits the caller's budget, on the worker that serves
it soonest.

For each member: memory (measured peak on the worker's device class, else weight bytes), context
length (prompt + max_tokens ≤ max_model_len) and the accuracy floor (quality = chat agreement with
the parent on held-out chat prompts, measured at the dtype the member is served at on the worker's
device class: a bfloat16 worker is not credited with float32's figure) are static checks. Before any
of them, routed traffic skips a member that is unfit under the family's fitness policy (degenerate
chat answers, chat agreement under the family's floor; issue 10), best effort included; a request pinned to it is still served, with a
warning on its Choice. For each of its available workers, latency is predicted from the
registry's latency model for that device class, at the worker's current load, and scaled by what
the gateway has observed of that worker (EWMA of observed/predicted, fading back to 1 while
nothing is observed: server.pool), plus one step of each busy
member that shares its worker process (server.shared_worker). On a device class where the
member was never profiled, the model is predicted from the device's bandwidth and the member's bytes
(family/devices.py, marked `predicted`) until `family profile` measures it; a member on a device class
the registry knows nothing about fits only budgets without latency limits. Memory is the member's
own need (weights + KV cache), measured or predicted likewise. Among what fits, the winner is
the highest quality, then the lower perplexity, then the smaller member; its worker is the one with
the lowest predicted latency. `live=False` ignores load and observations: the static-table baseline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from family.fit import Verdict, latency_verdict, static_verdict
from family.latency import LatencyPrediction, predict_latency
from family.registry import Family, MemberRecord, rank_key
from server.errors import APIError
from server.pool import Pool, WorkerState
from server.protocol import Budget
from server.shared_worker import siblings_step_s


@dataclass
class Choice:
    member: MemberRecord
    worker: WorkerState
    predicted: LatencyPrediction | None  # the registry's prediction times the worker's observed ratios (when live)
    baseline: LatencyPrediction | None  # the registry's own, which the ratios scale: what observed latencies are compared with
    reason: str  # "pinned", "best", "best_effort"
    warning: str | None = None  # e.g. the pinned member is unfit; the gateway sends it as x-family-warning
    first: bool = False  # predicted as served deadline first (server.deadline_scheduling): its times feed those ratios


@dataclass
class RouteResult:
    choices: list[Choice] = field(default_factory=list)  # best first
    refused: list[Verdict] = field(default_factory=list)
    pinned: str | None = None  # the member the request named, if any (it may be served even when unfit)


def _unfit_warning(m: MemberRecord, why: str | None) -> str | None:
    """What the caller of a pinned, unfit member is told (the x-family-warning header)."""
    return f"member {m.name} is unfit: {why}" if why else None


def _predict(family: Family, pool: Pool, m: MemberRecord, w: WorkerState, prompt_tokens: int, max_tokens: int, live: bool,
             cached: int = 0, idle: bool = False, first: bool = False) -> tuple[LatencyPrediction | None, LatencyPrediction | None]:
    """(the prediction to route by, the registry's baseline it scales). `cached`: prompt tokens this
    worker likely holds in its prefix cache (server.affinity); only a worker that caches prefixes
    skips their prefill. `idle`: live, but as if the worker had no load (its observed speed still counts).
    Live and loaded, the baseline includes one step of each busy member sharing the worker (server.shared_worker).
    A request the worker serves deadline `first` (server.deadline_scheduling) waits only for the other
    such requests: its baseline counts those alone (the member's and its siblings' deadline-first
    requests in flight, which the gateway knows the moment they start and end, so a burst of them
    raises the prediction only while it lasts), scaled by the ratios such requests on that worker teach."""
    load = (w.first_in_flight if first else w.load()) if live and not idle else 0
    uncached = max(1, prompt_tokens - cached) if cached and w.spec.prefix_caching else prompt_tokens
    base = predict_latency(m, w.spec.device_class, uncached, max_tokens, load + 1, family.registry.devices)  # measured, else predicted
    if base is None or not live:
        return base, base
    if not idle and (shared := siblings_step_s(family, pool, w, prompt_tokens, max_tokens, first)):
        ttft, tpot = base.ttft_s + shared, base.tpot_s + shared
        base = LatencyPrediction(ttft, tpot, ttft + tpot * max(0, max_tokens - 1))
    ttft_ratio, tpot_ratio = w.ratios(first)
    ttft, tpot = base.ttft_s * ttft_ratio, base.tpot_s * tpot_ratio
    return LatencyPrediction(ttft, tpot, ttft + tpot * max(0, max_tokens - 1)), base


PromptTokens = int | Mapping[str, int]  # one count for all members, or each member's own (its tokenizer's)


def _tokens(prompt_tokens: PromptTokens, member: str) -> int:
    return prompt_tokens if isinstance(prompt_tokens, int) else prompt_tokens[member]


def route(
    family: Family, pool: Pool, budget: Budget, *, prompt_tokens: PromptTokens, max_tokens: int, pinned: str | None = None,
    exclude: set[str] = frozenset(), live: bool = True, allowed: frozenset[str] | None = None,
    cached: Mapping[tuple[str, str], int] | None = None, idle: bool = False,
) -> RouteResult:
    """Every (member, worker) that fits, best first, and for the rest why not. O(members × workers).
    `allowed`: the only members a routed request may reach (its API key's list, server.caps).
    `cached`: (worker, member) → prompt tokens it likely has cached for this request (server.affinity).
    `idle`: what would fit with no load on any worker, at each worker's observed speed (admission
    control: what only load keeps from fitting is worth waiting for; what is too slow even idle is not)."""
    members = [family.registry.member(pinned)] if pinned else [m for m in family.servable if allowed is None or m.name in allowed]
    result = RouteResult(pinned=pinned)
    fits: list[tuple[tuple, float, Choice]] = []
    policy, devices = family.registry.fitness, family.registry.devices
    urgent = budget.max_latency_ms is not None or budget.max_ttft_ms is not None  # the gateway sends it as a deadline
    for m in sorted(members, key=rank_key):
        workers = [w for w in pool.for_member(m.name) if w.available() and w.name not in exclude]
        if not workers:
            unfit = None if pinned else m.unfit_reason(policy)
            result.refused.append(Verdict(m.name, "unfit", unfit, float("inf")) if unfit else
                                  Verdict(m.name, "unavailable", "no healthy worker", float("inf")))
            continue
        p = _tokens(prompt_tokens, m.name)
        best_verdict = None
        for w in workers:
            dtype = m.serving_dtype(w.spec.device_class, devices)  # its accuracy and fitness are those at this dtype
            first = urgent and live and not idle and w.spec.deadline_scheduling  # served deadline first there
            unfit = m.unfit_reason(policy, dtype)
            if unfit and not pinned:  # whatever the budget: never routed to, not even as best effort
                verdict = Verdict(m.name, "unfit", unfit, float("inf"))
            else:
                verdict = static_verdict(m, w.spec.device_class, devices, need_tokens=p + max_tokens,
                                         max_memory_gb=budget.max_memory_gb, min_accuracy=budget.min_accuracy)
            pred, base = _predict(family, pool, m, w, p, max_tokens, live, (cached or {}).get((w.name, m.name), 0),
                                  idle, first) if verdict is None else (None, None)
            verdict = verdict or latency_verdict(m, pred, max_ttft_ms=budget.max_ttft_ms, max_latency_ms=budget.max_latency_ms,
                                                 max_tpot_ms=budget.max_tpot_ms)
            if verdict is None:
                e2e = pred.e2e_s if pred else float("inf")
                choice = Choice(m, w, pred, base, "pinned" if pinned else "best", _unfit_warning(m, unfit), first)
                fits.append((rank_key(m, dtype), e2e, choice))
            elif best_verdict is None or verdict.violation < best_verdict.violation:
                best_verdict = verdict
        if best_verdict is not None and not any(c.member.name == m.name for _, _, c in fits):
            result.refused.append(best_verdict)
    fits.sort(key=lambda t: (t[0], t[1]))
    result.choices = [c for _, _, c in fits]
    return result


def best_effort(family: Family, pool: Pool, result: RouteResult, *, prompt_tokens: PromptTokens, max_tokens: int,
                exclude: set[str] = frozenset(), live: bool = True) -> list[Choice]:
    """When nothing fits and the caller allows it: the members closest to fitting, closest first
    (never one whose context is too short, which cannot work at all, nor an unfit one unless pinned)."""
    order = sorted((v for v in result.refused if v.constraint not in ("context_length", "unavailable", "unfit")), key=lambda v: v.violation)
    out = []
    for v in order:
        m = family.registry.member(v.member)
        workers = [w for w in pool.for_member(m.name) if w.available() and w.name not in exclude]
        workers.sort(key=lambda w: w.load())
        for w in workers:
            warning = _unfit_warning(m, m.unfit_reason(family.registry.fitness, m.serving_dtype(w.spec.device_class, family.registry.devices)))
            if warning and m.name != result.pinned:
                continue
            pred, base = _predict(family, pool, m, w, _tokens(prompt_tokens, m.name), max_tokens, live)
            out.append(Choice(m, w, pred, base, "best_effort", warning))
    return out


def no_fit_error(result: RouteResult, budget: Budget, pinned: str | None, prompt_param: str = "messages") -> APIError:
    """422 naming the constraint that failed and the member that came closest, and any unfit members
    (relaxing the budget never reaches those: only naming one in `model` does)."""
    if not result.refused:
        return APIError(503, "no worker is available", type="server_error", code="no_workers")
    unfit = [v for v in result.refused if v.constraint == "unfit"]
    budgeted = [v for v in result.refused if v.constraint not in ("unavailable", "unfit")]
    if not budgeted and len(unfit) < len(result.refused):  # a fit member would do, but has no healthy worker now
        return APIError(503, f"no healthy worker for {pinned or 'any fit member'}; retry shortly", type="server_error",
                        code="no_healthy_worker", headers={"Retry-After": "2"})
    unfit_note = "; ".join(f"{v.member} ({v.detail})" for v in unfit)
    if not budgeted:  # every member is unfit: no budget change helps
        return APIError(
            422,
            f"no member of the family may take routed traffic: unfit, never routed to: {unfit_note}. "
            "Name a member in `model` to use it anyway.",
            type="budget_error",
            param="model",
            code="members_unfit",
        )
    closest = min(budgeted, key=lambda v: v.violation)
    if closest.constraint == "context_length":
        return APIError(400, f"prompt too long for {closest.member}: {closest.detail}", param=prompt_param, code="context_length_exceeded")
    what = f"member {pinned}" if pinned else "no member of the family"
    also = f" Unfit members are never routed to: {unfit_note}." if unfit else ""
    return APIError(
        422,
        f"{what} fits the budget: {closest.constraint} failed ({closest.detail}); closest member: {closest.member}. "
        "Relax the budget or set allow_best_effort." + also,
        type="budget_error",
        param=f"budget.{closest.constraint}",
        code="budget_unsatisfiable",
    )
