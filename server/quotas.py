"""Token quotas per API key, shared by every gateway replica: tokens per minute and tokens per day.

A key's `tokens_per_minute` and `tokens_per_day` (server.keys) are counted in fixed windows (the UTC
minute, the UTC day) held in the state store (server.state): in Redis with `--state redis://...`, so
the quota holds across all replicas, else in this replica's memory.

- **Reserved before sending**: once the prompt is tokenized, the request reserves its worst case,
  prompt tokens + max_tokens, in every window at once, atomically (one Lua script on Redis). If any
  window would pass its limit the request is refused before any worker sees it: 429 in OpenAI's shape,
  `code: tokens_per_minute_exceeded` or `daily_tokens_exceeded`, with `Retry-After` (seconds to the
  window's end). Reserving the worst case is what makes the quota exact under concurrency: two requests
  can never both spend the last tokens.
- **Settled with the real usage** when the response is over: the difference between the reservation
  and what the worker reports (`usage`; for a stream without `include_usage`, the prompt plus the token
  chunks the gateway relayed) goes back to the windows. A request that no worker served is refunded in
  full.
- **When the store is unreachable** (Redis down or hung; each call gives up after 1 s at most and the store
  is not retried for a second): the failure policy applies, `--state-failure open` (default) or `closed`.
  `open` serves the request unreserved (logged, counted in `family_quota_decisions_total{decision=
  "state_unavailable_open"}`); `closed` answers 503 `quota_state_unavailable` with `Retry-After: 1`.
  Open is the default because the quota is a spending control, not an access control: the key is still
  authenticated and its member list, caps, request rate and concurrency (per replica) still hold, so an
  outage of the shared store costs at most the tokens served while it lasts, whereas closed would turn
  a Redis outage into a full outage of the gateway (the same default as Envoy's global rate limit filter,
  `failure_mode_deny: false`). Operators who bill by quota choose `closed`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Literal

from server.errors import APIError
from server.keys import KeySpec
from server.metrics import GatewayMetrics
from server.state import Counter, MemoryState, StateBackend, StateUnavailable

log = logging.getLogger("server.quotas")
FailurePolicy = Literal["open", "closed"]
FAILURE_POLICIES: tuple[str, ...] = ("open", "closed")
MINUTE_TTL_S = 120  # a minute's counter outlives its minute (a late settlement still finds it)
DAY_TTL_S = 2 * 86400
LOG_EVERY_S = 10.0  # one warning per this long while the store is down, not one per request


class Quotas:
    """Reserve and settle a key's tokens against the shared state, under a failure policy."""

    def __init__(self, state: StateBackend | None = None, failure: FailurePolicy = "open", metrics: GatewayMetrics | None = None,
                 clock: Callable[[], float] = time.time):
        if failure not in FAILURE_POLICIES:
            raise ValueError(f"failure policy must be one of {FAILURE_POLICIES}, got {failure!r}")
        self.state = state or MemoryState()
        self.failure, self.metrics, self.clock = failure, metrics, clock
        self._tasks: set[asyncio.Task] = set()  # settlements in flight (kept referenced until done)
        self._logged = 0.0

    def ticket(self, key: KeySpec | None) -> "Ticket":
        """The request's ticket: a no-op for a key without token quotas (no call to the store at all)."""
        if key is None or (key.tokens_per_minute is None and key.tokens_per_day is None):
            return NO_QUOTA
        return Ticket(self, key)

    def counters(self, key: KeySpec, now: float) -> list[tuple[Counter, str]]:
        """The key's windows at `now`, each with the error code for passing it. One Redis hash tag per key
        ({sha256}), so a key's counters live on one cluster slot and one script may touch them all."""
        tag = f"family:quota:{{{key.sha256}}}"
        out = []
        if key.tokens_per_minute is not None:
            out.append((Counter(f"{tag}:m:{int(now // 60)}", key.tokens_per_minute, MINUTE_TTL_S), "tokens_per_minute_exceeded"))
        if key.tokens_per_day is not None:
            out.append((Counter(f"{tag}:d:{int(now // 86400)}", key.tokens_per_day, DAY_TTL_S), "daily_tokens_exceeded"))
        return out

    def _decision(self, key: KeySpec, decision: str) -> None:
        if self.metrics is not None:
            self.metrics.quota.labels(key.name, decision).inc()

    def _unavailable(self, exc: StateUnavailable, op: str) -> None:
        if self.metrics is not None:
            self.metrics.state_errors.labels(op).inc()
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY_S:
            self._logged = now
            log.warning("quota state unavailable (%s; policy: fail %s): %s", op, self.failure, exc)

    def settle_later(self, counters: list[Counter], delta: int) -> None:
        """Give back (or take) `delta` tokens in the background: the response is already on its way."""
        if not delta or not counters:
            return
        task = asyncio.get_running_loop().create_task(self._adjust(counters, delta))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adjust(self, counters: list[Counter], delta: int) -> None:
        try:
            await self.state.adjust(counters, delta)
        except StateUnavailable as exc:
            self._unavailable(exc, "settle")

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Wait (briefly) for settlements still in flight: at shutdown, so none is lost."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def close(self) -> None:
        await self.drain()
        await self.state.close()


class Ticket:
    """One request's reservation: reserved once before sending, told the real usage, settled at the end.

    The charge follows what is known: `reserved` until the response is over, then the usage (nothing if
    no worker served it). A usage learned after the end (a stream's relay can finish after its caller
    left) settles the difference then, so no path charges twice or leaks a reservation."""

    enabled = True  # False only for NO_QUOTA: the request path skips the calls (and their cost) entirely

    def __init__(self, quotas: Quotas, key: KeySpec):
        self.quotas, self.key = quotas, key
        self.counters: list[Counter] = []
        self.reserved = 0
        self.charged = 0  # what the windows hold for this request now
        self.usage: int | None = None  # tokens the request really used, once known
        self.finished = False

    async def reserve(self, amount: int) -> None:
        """Reserve `amount` tokens (prompt + max_tokens) in every window of the key, or raise 429 (or 503
        under the closed policy when the store is unreachable)."""
        q, key = self.quotas, self.key
        now = q.clock()
        windows = q.counters(key, now)
        counters = [c for c, _ in windows]
        try:
            over, values = await q.state.reserve(counters, amount)
        except StateUnavailable as exc:
            q._unavailable(exc, "reserve")
            if q.failure == "open":
                q._decision(key, "state_unavailable_open")
                return  # served unreserved: nothing to settle
            q._decision(key, "state_unavailable_closed")
            raise APIError(503, "the quota store is unreachable and this gateway fails closed; retry shortly",
                           type="server_error", code="quota_state_unavailable", headers={"Retry-After": "1"}) from None
        if over is not None:
            counter, code = windows[over]
            window_s = 60 if code == "tokens_per_minute_exceeded" else 86400
            retry = max(1, math.ceil(window_s - now % window_s))
            what = "tokens per minute" if window_s == 60 else "tokens per day"
            alone = " (more than the whole quota: lower max_tokens)" if amount > counter.limit else ""
            q._decision(key, "over_tokens_per_minute" if window_s == 60 else "over_daily_tokens")
            raise APIError(429, f"{key.name}: this request needs up to {amount} tokens (prompt + max_tokens){alone}; "
                                f"{values[over]} of the key's {counter.limit} {what} are taken; the window resets in {retry} s",
                           type="rate_limit_error", code=code, headers={"Retry-After": str(retry)})
        self.counters, self.reserved, self.charged = counters, amount, amount
        q._decision(key, "reserved")

    @property
    def active(self) -> bool:
        """Whether tokens were reserved (so the gateway should look for the real usage)."""
        return bool(self.counters)

    def used(self, tokens: int | None) -> None:
        """The request's real usage (prompt + completion tokens); None: not reported."""
        if tokens is None:
            return
        self.usage = tokens
        if self.finished:
            self._charge(tokens)

    def finish(self) -> None:
        """The response is over (sent or abandoned): charge the usage, or nothing if none is known."""
        if not self.finished:
            self.finished = True
            self._charge(self.usage or 0)

    def _charge(self, tokens: int) -> None:
        if self.counters and tokens != self.charged:
            self.quotas.settle_later(self.counters, tokens - self.charged)
            self.charged = tokens


class _NoQuota(Ticket):
    """For keys without token quotas (and gateways without keys): every call is free."""

    enabled = False

    def __init__(self):
        self.counters, self.reserved, self.charged, self.usage, self.finished = [], 0, 0, None, True

    async def reserve(self, amount: int) -> None:
        return None

    def used(self, tokens: int) -> None:
        pass

    def finish(self) -> None:
        pass


NO_QUOTA = _NoQuota()
