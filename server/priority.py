"""Priority classes and admission control: who gets a worker when the fitting workers are saturated.

A family can shed load *downward*: a request that may yield moves to a smaller member before it is
refused. The gateway gives every worker a number of slots (requests it sends at once: the fleet
file's `max_concurrent`, else `--worker-slots`); past them, requests wait in the gateway's own queue,
where the gateway can still choose who goes first, instead of in the worker's, where it cannot.

- **critical** keeps its member (the one that fits its budget at a light load: predicted queueing
  never moves it), waits for a slot there ahead of everyone else, and when the queue is full it takes
  the place of a waiting sheddable request.
- **standard** takes the first choice with a free slot (the router's order: the most accurate member
  that fits its budget at the current load), else waits behind critical requests.
- **sheddable** may fill only half of a worker's slots (at least one): the rest is headroom for the
  others, since a running request is never preempted. When its best member is saturated (no slot free
  to it, or its predicted queueing breaks the budget there), it moves to the *smallest* member that
  still fits its budget, if that has a slot free to it (counted as a downshift); else it waits briefly
  for either, last in line and evictable; then it gets a 429 with Retry-After (counted as shed). When no member fits at the current load but one would at a light
  load, it is shed at once.

Every wait is bounded (by what is left of the budget's TTFT or latency limit, else `max_wait_s`), and
a request that cannot be admitted in time gets an explicit 429/503 with Retry-After: none simply
times out. State lives in this gateway replica only (slots count this replica's requests).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field, replace

from fastapi import Request

from server.deadlines import DEFAULT_S as FIRST_TOKEN_DEFAULT_S
from server.errors import APIError
from server.keys import KeySpec
from server.metrics import GatewayMetrics
from server.pool import WorkerState
from server.protocol import Budget, Priority
from server.router import Choice

PRIORITIES: tuple[Priority, ...] = ("critical", "standard", "sheddable")
RANK = {p: i for i, p in enumerate(PRIORITIES)}
HEADER = "x-priority"
DEFAULT_SLOTS = 8  # per worker: the torch worker's default batch is 16, vLLM-CPU's a few; room to batch, not to queue
DEFAULT_MAX_WAIT_S = 10.0  # the longest a request without a latency budget waits for a slot
SHEDDABLE_MAX_WAIT_S = 1.0  # sheddable requests yield sooner
SHEDDABLE_SHARE = 0.5  # of a worker's slots (at least one): the rest is headroom for critical and standard requests
DEFAULT_MAX_QUEUE = 256  # waiting requests per gateway replica


def resolve_priority(body: Priority | None, request: Request, key: KeySpec | None) -> Priority:
    """Body overrides the header, which overrides the API key's default; else standard."""
    if body is not None:
        return body
    header = request.headers.get(HEADER)
    if header is not None:
        value = header.strip().lower()
        if value not in RANK:
            raise APIError(400, f"header {HEADER}: must be one of {', '.join(PRIORITIES)}, got {header[:40]!r}", param=HEADER,
                           code="invalid_priority")
        return value  # type: ignore[return-value]
    return (key.priority if key is not None and key.priority else None) or "standard"


def shed_error(why: str, retry_after_s: int = 1) -> APIError:
    return APIError(429, f"sheddable request shed under load: {why}; retry shortly", type="rate_limit_error", code="shed",
                    headers={"Retry-After": str(retry_after_s)})


def overloaded_error(why: str, retry_after_s: int = 1) -> APIError:
    return APIError(503, f"every worker that fits is busy: {why}; retry shortly", type="server_error", code="overloaded",
                    headers={"Retry-After": str(retry_after_s)})


@dataclass(order=True)
class _Waiter:
    rank: int
    seq: int
    choices: list[Choice] = field(compare=False)
    granted: asyncio.Future = field(compare=False)
    priority: Priority = field(compare=False, default="standard")


@dataclass
class Admitted:
    choice: Choice
    how: str  # "free", "queued", "downshift"
    waited_s: float = 0.0
    last_choice: bool = False  # nothing else fits: a late first token beats none (server.deadlines)


class Admission:
    """Slots per worker and the priority queue of requests waiting for one (one event loop; no locks)."""

    def __init__(self, metrics: GatewayMetrics, slots: int = DEFAULT_SLOTS, max_wait_s: float = DEFAULT_MAX_WAIT_S,
                 max_queue: int = DEFAULT_MAX_QUEUE, sheddable_wait_s: float = SHEDDABLE_MAX_WAIT_S):
        self.metrics, self.default_slots, self.max_wait_s = metrics, slots, max_wait_s
        self.max_queue, self.sheddable_wait_s = max_queue, sheddable_wait_s
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()

    # --- slots -------------------------------------------------------------------------------------

    def slots(self, w: WorkerState) -> int:
        return w.spec.max_concurrent or self.default_slots

    def free(self, w: WorkerState, priority: Priority = "standard") -> bool:
        """A slot is free for this priority: sheddable requests may fill only SHEDDABLE_SHARE of a worker's
        slots, so critical and standard traffic finds headroom there without preempting anyone."""
        slots = self.slots(w)
        return w.in_flight < (max(1, int(slots * SHEDDABLE_SHARE)) if priority == "sheddable" else slots)

    def take(self, w: WorkerState) -> None:
        w.in_flight += 1
        self.metrics.in_flight.labels(w.name, w.spec.member).set(w.in_flight)

    def release(self, w: WorkerState) -> None:
        """A request left `w`: give its slot to the first waiter (by priority, then arrival) that can use it."""
        w.in_flight -= 1
        self.metrics.in_flight.labels(w.name, w.spec.member).set(w.in_flight)
        self._grant()

    def _grant(self) -> None:
        for waiter in sorted(self._waiters):
            if waiter.granted.done():
                continue
            choice = next((c for c in waiter.choices if c.worker.available() and self.free(c.worker, waiter.priority)), None)
            if choice is not None:
                self.take(choice.worker)  # reserved now: nobody can take it before the waiter wakes
                waiter.granted.set_result(choice)

    # --- admission ----------------------------------------------------------------------------------

    async def admit(self, priority: Priority, live: list[Choice], light: list[Choice], budget: Budget, routed: bool) -> Admitted:
        """Pick a choice and take its slot, waiting if need be. `live`: what fits at the current load
        (router order); `light`: what fits at a light load (the router without live load). 429/503
        with Retry-After when it cannot be admitted in time."""
        if priority == "critical":
            keep = (light or live)[0].member.name
            group = [c for c in live if c.member.name == keep] or [c for c in light if c.member.name == keep]
            return await self._free_or_wait(priority, group, budget)
        if priority == "standard":
            return await self._free_or_wait(priority, live or light, budget)
        if not live:  # fits only at a light load: predicted queueing breaks the budget everywhere
            self.metrics.sheds.labels("predicted_queueing").inc()
            raise shed_error("predicted queueing past the budget on every member that fits it")
        best = (light or live)[0].member.name
        on_best = [c for c in live if c.member.name == best]
        pick = next((c for c in on_best if self.free(c.worker, priority)), None)
        if pick is not None:
            self.take(pick.worker)
            return Admitted(pick, "free")
        smallest = min(live, key=lambda c: c.member.parameters).member.name if routed else best
        if smallest != best:  # the best member is saturated: the smallest member that fits, if it has room
            for c in sorted((c for c in live if c.member.name == smallest), key=lambda c: c.worker.load()):
                if self.free(c.worker, priority):
                    self.take(c.worker)
                    self.metrics.downshifts.labels(best, c.member.name).inc()
                    return Admitted(replace(c, reason="downshift"), "downshift")  # x-family-route: downshift
        # Neither has room: wait briefly for either (never for a member in between: that would not free the best one
        # and would cost the capacity a downshift is meant to save).
        admitted = await self._free_or_wait(priority, [c for c in live if c.member.name in (best, smallest)], budget)
        if admitted.choice.member.name != best:
            self.metrics.downshifts.labels(best, admitted.choice.member.name).inc()
            admitted.choice = replace(admitted.choice, reason="downshift")
        return admitted

    async def _free_or_wait(self, priority: Priority, group: list[Choice], budget: Budget) -> Admitted:
        pick = next((c for c in group if self.free(c.worker, priority)), None)
        if pick is not None:
            self.take(pick.worker)
            return Admitted(pick, "free")
        wait_s = self.wait_bound(priority, group[0], budget)
        if wait_s <= 0:
            raise self.refuse(priority, "no slot free and no time left in the budget to wait for one", "no_time")
        if len(self._waiters) >= self.max_queue and not self._evict_for(priority):
            raise self.refuse(priority, f"the gateway's queue is full ({self.max_queue} waiting)", "queue_full")
        waiter = _Waiter(RANK[priority], next(self._seq), group, asyncio.get_running_loop().create_future(), priority)
        self._waiters.append(waiter)
        self.metrics.queued.set(len(self._waiters))
        start = time.perf_counter()
        try:
            choice = await asyncio.wait_for(asyncio.shield(waiter.granted), wait_s)
        except asyncio.TimeoutError:
            if waiter.granted.done() and not waiter.granted.cancelled() and waiter.granted.exception() is None:
                choice = waiter.granted.result()  # granted at the last moment: use it
            else:
                raise self.refuse(priority, f"no slot within {wait_s * 1e3:.0f} ms", "wait_expired") from None
        except asyncio.CancelledError:  # the caller went away while waiting: give back a slot granted meanwhile
            if waiter.granted.done() and not waiter.granted.cancelled() and waiter.granted.exception() is None:
                self.release(waiter.granted.result().worker)
            raise
        finally:
            if waiter in self._waiters:  # an evicted waiter is already gone
                self._waiters.remove(waiter)
            self.metrics.queued.set(len(self._waiters))
            if not waiter.granted.done():
                waiter.granted.cancel()
        waited = time.perf_counter() - start
        self.metrics.queue_wait.labels(priority).observe(waited)
        return Admitted(choice, "queued", waited)

    def wait_bound(self, priority: Priority, choice: Choice, budget: Budget) -> float:
        """How long a request may wait for a slot: what its budget leaves after the predicted service
        (TTFT for a TTFT limit, the whole request for a latency limit), at most the default. A critical
        request waits the default whatever its budget: it is never refused on a prediction."""
        bound = self.sheddable_wait_s if priority == "sheddable" else self.max_wait_s
        pred = choice.predicted
        if pred is not None and priority != "critical":
            if budget.max_ttft_ms is not None:
                bound = min(bound, budget.max_ttft_ms / 1e3 - pred.ttft_s)
            if budget.max_latency_ms is not None:
                bound = min(bound, budget.max_latency_ms / 1e3 - pred.e2e_s)
        return bound

    def _evict_for(self, priority: Priority) -> bool:
        """A full queue: a critical or standard arrival takes the place of the newest sheddable waiter."""
        if priority == "sheddable":
            return False
        victims = [w for w in self._waiters if w.priority == "sheddable" and not w.granted.done()]
        if not victims:
            return False
        victim = max(victims, key=lambda w: w.seq)
        victim.granted.set_exception(shed_error(f"its place in the queue went to a {priority} request"))
        self.metrics.sheds.labels("evicted").inc()
        self._waiters.remove(victim)
        return True

    def refuse(self, priority: Priority, why: str, reason: str) -> APIError:
        if priority == "sheddable":
            self.metrics.sheds.labels(reason).inc()
            return shed_error(why)
        self.metrics.overloaded.labels(priority, reason).inc()
        return overloaded_error(why)


@dataclass(frozen=True)
class RoutingPolicy:
    """The gateway's issue-12 knobs in one place (`family serve` flags; tests set them directly)."""

    worker_slots: int = DEFAULT_SLOTS  # per worker, unless its fleet entry sets max_concurrent
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    sheddable_wait_s: float = SHEDDABLE_MAX_WAIT_S
    max_queue: int = DEFAULT_MAX_QUEUE
    affinity: bool = True
    affinity_max_extra_load: float = 2.0
    first_token_s: float = FIRST_TOKEN_DEFAULT_S  # default first-token deadline (server.deadlines)

    def admission(self, metrics: GatewayMetrics) -> Admission:
        return Admission(metrics, self.worker_slots, self.max_wait_s, self.max_queue, self.sheddable_wait_s)
