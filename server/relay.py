"""Relaying a worker's answer to the caller, and learning from it.

A streamed answer is read up to its first token before anything reaches the caller (`head`), so an
attempt that fails or stalls before it can still be retried elsewhere; the rest is relayed chunk by
chunk (`stream`), and a worker that dies mid-stream ends the caller's stream with an error event and
`data: [DONE]`. Either way the observed TTFT and TPOT feed the worker's latency ratios (routing
steers by them), the goodput counters and the key's token quota.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import AsyncIterator

import aiohttp

from server.deadlines import FirstTokenTimeout
from server.metrics import GatewayMetrics, budget_class
from server.pool import UPSTREAM_ERRORS, Pool, WorkerState
from server.priority import Admission
from server.protocol import SSE_DONE, Budget, sse
from server.quotas import NO_QUOTA, Ticket
from server.router import Choice
from server.tracing import NO_TRACE, RequestTrace


class Relay:
    """What happens once a worker answers: relay, observe, release the worker slot."""

    def __init__(self, pool: Pool, metrics: GatewayMetrics, admission: Admission, live: bool):
        self.pool, self.metrics, self.admission, self.live = pool, metrics, admission, live

    def check_budget(self, choice: Choice, budget: Budget, ttft: float | None, e2e: float, tpot: float | None = None) -> None:
        member = choice.member.name
        missed = [name for name, limit, seen in (("max_ttft_ms", budget.max_ttft_ms, ttft), ("max_latency_ms", budget.max_latency_ms, e2e),
                                                 ("max_tpot_ms", budget.max_tpot_ms, tpot))
                  if limit is not None and seen is not None and seen * 1e3 > limit]
        for name in missed:
            self.metrics.budget_misses.labels(member, name).inc()
        self.metrics.goodput.labels(budget_class(budget), "missed" if missed else "met").inc()

    def enter(self, choice: Choice) -> None:
        """The request goes to `choice`'s worker (its slot is already taken): counted among the requests
        that worker serves deadline first, if it is one (server.router predicts those by that count)."""
        choice.worker.first_in_flight += choice.first

    def leave(self, choice: Choice) -> None:
        choice.worker.first_in_flight -= choice.first
        self.admission.release(choice.worker)  # wakes the first waiter (by priority) that can use the slot

    def stalled(self, choice: Choice, deadline_s: float) -> None:
        """An attempt with no first token by its deadline: counted, and fed to the worker's observed TTFT
        ratio (it took at least the deadline) so routing steers away; no cooldown (server.deadlines)."""
        w = choice.worker
        self.metrics.deadline_cancels.labels(w.name).inc()
        if choice.baseline is not None and self.live:
            w.observe(choice.baseline.ttft_s, deadline_s, None, None, first=choice.first)

    async def head(self, upstream: aiohttp.ClientResponse, start: float) -> tuple[list[bytes], float | None]:
        """Read up to the first token (or the end), so a worker that fails before it is retried elsewhere."""
        head: list[bytes] = []
        while True:
            line = (await upstream.content.readline()).strip()
            if not line:
                if upstream.content.at_eof():
                    raise UpstreamEnded
                continue
            head.append(line)
            if _TOKEN.search(line):
                return head, time.perf_counter() - start
            if line == _DONE or line.startswith(b"data: {\"error\""):
                return head, None

    async def stream(self, upstream: aiohttp.ClientResponse, head: list[bytes], ttft: float | None, choice: Choice,
                     budget: Budget, start: float, ticket: Ticket = NO_QUOTA, trace: RequestTrace = NO_TRACE,
                     prompt_tokens: int = 0) -> AsyncIterator[bytes]:
        w, member = choice.worker, choice.member.name
        last = time.perf_counter() if ttft is not None else None
        chunks = 1 if ttft is not None else 0
        outcome, done = "ok", False
        if ttft is not None:
            self.metrics.ttft.labels(member).observe(ttft)
        try:
            for line in head:
                done = done or line == _DONE
                yield line + b"\n\n"
            while not done:
                line = (await upstream.content.readline()).strip()
                if not line:
                    if upstream.content.at_eof():
                        raise UpstreamEnded
                    continue
                if line == _DONE:
                    done = True
                elif line.startswith(b"data: {\"error\""):
                    outcome = "upstream_error"
                elif _TOKEN.search(line):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - start
                        self.metrics.ttft.labels(member).observe(ttft)
                    else:
                        self.metrics.itl.labels(member).observe(now - last)
                    last = now
                    chunks += 1
                elif ticket.active and (m := _TOTAL_TOKENS.search(line)):  # the usage chunk (stream_options.include_usage)
                    ticket.used(int(m.group(1)))
                yield line + b"\n\n"
        except (*UPSTREAM_ERRORS, UpstreamEnded) as exc:
            outcome = "stream_error"
            self.pool.fail(w, f"stream ended early ({type(exc).__name__})")
            yield sse({"error": {"message": f"worker {w.name} failed mid-stream", "type": "server_error", "param": None,
                                 "code": "upstream_failed"}}).encode()
            yield SSE_DONE.encode()
        finally:
            if done:
                upstream.release()
            else:  # unfinished (worker died or the caller went away): drop the connection
                upstream.close()
            self.leave(choice)
            e2e = time.perf_counter() - start
            self.metrics.e2e.labels(member).observe(e2e)
            self.metrics.requests.labels(member, w.name, outcome if done or outcome != "ok" else "cancelled").inc()
            trace.observed(ttft, e2e)
            trace.set(outcome=outcome if done or outcome != "ok" else "cancelled")
            if ticket.active and ticket.usage is None:  # no usage chunk: the prompt and the token chunks relayed
                ticket.used(prompt_tokens + chunks)
            if outcome == "ok" and done:
                base = choice.baseline
                tpot = (last - start - ttft) / (chunks - 1) if chunks > 1 and ttft is not None and last is not None else None
                if base is not None and ttft is not None and last is not None:
                    w.observe(base.ttft_s, ttft, base.tpot_s, tpot, first=choice.first)
                self.check_budget(choice, budget, ttft, e2e, tpot)
            elif outcome != "ok":  # broke mid-stream (a caller who left is not counted)
                self.metrics.goodput.labels(budget_class(budget), "failed").inc()

    def observe_whole(self, choice: Choice, content: bytes, e2e: float, budget: Budget) -> None:
        w, member = choice.worker, choice.member.name
        self.metrics.e2e.labels(member).observe(e2e)
        self.metrics.requests.labels(member, w.name, "ok").inc()
        pred, base = choice.predicted, choice.baseline
        if pred is not None and base is not None:
            try:
                n = json.loads(content)["usage"]["completion_tokens"]
            except (ValueError, KeyError, TypeError):
                n = 0
            if n > 1:
                observed_tpot = max(0.0, e2e - pred.ttft_s) / (n - 1)
                w.observe(None, None, base.tpot_s, observed_tpot, first=choice.first)
        self.check_budget(choice, budget, None, e2e)


async def by_deadline(deadline_s: float | None, start: float, step):
    """Await `step` (the upstream call, or reading to the first token) within the attempt's first-token
    deadline, counted from `start`; FirstTokenTimeout past it. No deadline: just await it."""
    if deadline_s is None:
        return await step
    try:
        return await asyncio.wait_for(step, max(0.0, deadline_s - (time.perf_counter() - start)))
    except asyncio.TimeoutError:
        if time.perf_counter() - start < deadline_s * 0.99:  # the upstream's own timeout, not the deadline
            raise
        raise FirstTokenTimeout(deadline_s) from None


class UpstreamEnded(Exception):
    """The worker's stream ended before [DONE] (it died or closed the connection)."""


_DONE = b"data: [DONE]"
_TOKEN = re.compile(rb'"(?:content|text)":"[^"]')  # a chunk carrying generated text (not the empty role chunk)
_TOTAL_TOKENS = re.compile(rb'"usage":\s*\{[^}]*"total_tokens":\s*(\d+)')


def total_tokens(content: bytes) -> int | None:
    """usage.total_tokens of a whole (non-streamed) response, or None when it has none."""
    m = _TOTAL_TOKENS.search(content)
    return int(m.group(1)) if m else None
