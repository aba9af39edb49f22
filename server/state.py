"""State that gateway replicas share: counters with a limit, reserved atomically.

Why a store of its own: a key's token quota (server.quotas) must hold across every replica of the
gateway, so its counters cannot live in one replica's memory. One small interface, two implementations:

- `MemoryState`: a dict in this process. Exact for one replica (a reservation never awaits between its
  check and its add); the default when no `--state` is given.
- `RedisState`: a real Redis (`--state redis://host:port/db`). A reservation is one Lua script, so the
  check of every counter and the add to all of them happen atomically on the server: two replicas
  reserving at the same instant cannot both pass a limit only one fits under.

The counters are plain integers named by the caller, each with a time to live (a window's counter
expires after its window). Every call raises `StateUnavailable` when the store cannot be reached, so
the caller applies its failure policy (server.quotas) instead of crashing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol


class StateUnavailable(Exception):
    """The shared store could not be reached (or did not answer in time)."""


@dataclass(frozen=True)
class Counter:
    """One counter: its name, its limit (None: no limit, counted only) and how long it lives."""

    name: str
    limit: int | None
    ttl_s: int


class StateBackend(Protocol):
    """Counters that every replica pointed at the same store shares."""

    url: str  # where the state lives, for logs and /v1/family ("memory" or a redis URL without password)

    async def reserve(self, counters: list[Counter], amount: int) -> tuple[int | None, list[int]]:
        """Add `amount` to every counter if none would pass its limit, atomically.

        Returns (index of the first counter that would pass its limit, or None when reserved; each
        counter's value after the call)."""

    async def adjust(self, counters: list[Counter], delta: int) -> None:
        """Add `delta` (may be negative) to the counters that still exist (a settled window's counter
        that has expired stays gone)."""

    async def close(self) -> None:
        """Release connections."""


class MemoryState:
    """Counters in this process: exact for one replica, not shared with any other."""

    url = "memory"

    def __init__(self, clock=time.monotonic):
        self._values: dict[str, tuple[int, float]] = {}  # name → (value, expires at)
        self._clock = clock

    def _get(self, name: str, now: float) -> int | None:
        held = self._values.get(name)
        if held is None or held[1] <= now:
            self._values.pop(name, None)
            return None
        return held[0]

    async def reserve(self, counters: list[Counter], amount: int) -> tuple[int | None, list[int]]:
        now = self._clock()
        values = [self._get(c.name, now) or 0 for c in counters]
        for i, (c, v) in enumerate(zip(counters, values)):
            if c.limit is not None and v + amount > c.limit:
                return i, values
        for c, v in zip(counters, values):
            expires = self._values[c.name][1] if c.name in self._values else now + c.ttl_s
            self._values[c.name] = (v + amount, expires)
        if len(self._values) > 100_000:  # expired windows of keys that stopped calling
            for name in [n for n, (_, t) in self._values.items() if t <= now]:
                del self._values[name]
        return None, [v + amount for v in values]

    async def adjust(self, counters: list[Counter], delta: int) -> None:
        now = self._clock()
        for c in counters:
            v = self._get(c.name, now)
            if v is not None:
                self._values[c.name] = (v + delta, self._values[c.name][1])

    async def close(self) -> None:
        pass


# KEYS: the counters; ARGV[1]: amount; then per counter its limit (-1: none) and its TTL in seconds.
# A counter's TTL is set when the script creates it (a window ends when it ends, not when it was last
# touched). Returns {index of the first counter over its limit (1-based) or 0, value of each counter}.
_RESERVE = """
local amount = tonumber(ARGV[1])
local values = {}
for i, key in ipairs(KEYS) do
  values[i] = tonumber(redis.call('GET', key) or '0')
  local limit = tonumber(ARGV[2 * i])
  if limit >= 0 and values[i] + amount > limit then
    return {i, unpack(values)}
  end
end
for i, key in ipairs(KEYS) do
  values[i] = redis.call('INCRBY', key, amount)
  if values[i] == amount then redis.call('EXPIRE', key, tonumber(ARGV[2 * i + 1])) end
end
return {0, unpack(values)}
"""
_ADJUST = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, ARGV[1]) end
end
return 0
"""


class RedisState:
    """Counters in a real Redis, shared by every replica pointed at it; each call is one atomic script.

    Short timeouts, so the failure policy applies fast: a Redis that is down (connection refused) costs a
    request about a millisecond, a hung one at most 2 × `timeout_s` (1 s; not less, or a busy 2-core
    machine times out a healthy Redis). After a failure the store is not tried again for `retry_s`
    (every request in between gets StateUnavailable at once), then the next request tries it again."""

    def __init__(self, url: str, *, timeout_s: float = 0.5, retry_s: float = 1.0):
        import redis.asyncio as redis  # only needed with --state redis://

        self._redis_module = redis
        self.url = _without_password(url)
        self._raw_url, self.timeout_s, self.retry_s = url, timeout_s, retry_s
        self._client = None
        self._scripts: dict = {}
        self._down_until = 0.0

    def _connect(self):
        if self._client is None:  # made on first use, inside the event loop that will use it
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # One immediate retry (a pooled connection that a restarted Redis dropped), not redis-py's
            # default of 10 with backoff: the failure policy, not a wait, answers a Redis that is down.
            self._client = self._redis_module.Redis.from_url(
                self._raw_url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s, retry=Retry(NoBackoff(), 1),
                health_check_interval=0, decode_responses=False)
            self._scripts = {"reserve": self._client.register_script(_RESERVE), "adjust": self._client.register_script(_ADJUST)}
        return self._client

    async def _run(self, script: str, keys: list[str], args: list) -> list:
        if time.monotonic() < self._down_until:
            raise StateUnavailable(f"redis at {self.url} failed less than {self.retry_s:g} s ago")
        self._connect()
        try:
            return await asyncio.wait_for(self._scripts[script](keys=keys, args=args), timeout=self.timeout_s * 2)
        except (self._redis_module.RedisError, OSError, asyncio.TimeoutError) as exc:
            self._down_until = time.monotonic() + self.retry_s
            raise StateUnavailable(f"redis at {self.url}: {type(exc).__name__}: {exc}"[:300]) from None

    async def reserve(self, counters: list[Counter], amount: int) -> tuple[int | None, list[int]]:
        args: list = [amount]
        for c in counters:
            args += [-1 if c.limit is None else c.limit, c.ttl_s]
        out = await self._run("reserve", [c.name for c in counters], args)
        over = int(out[0])
        return (over - 1 if over else None), [int(v) for v in out[1:]]

    async def adjust(self, counters: list[Counter], delta: int) -> None:
        if delta:
            await self._run("adjust", [c.name for c in counters], [delta])

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001 - closing a connection to a dead server must not fail a shutdown
                pass


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username + ':' if parts.username else ':'}***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_state(url: str | None) -> StateBackend:
    """The backend for `--state`: None or "memory" → MemoryState; redis:// or rediss:// or unix:// → RedisState."""
    from family.errors import FamilyError

    if url is None or url == "memory":
        return MemoryState()
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:
            return RedisState(url)
        except ImportError as exc:
            raise FamilyError("--state redis://... needs the redis package (pip install redis)") from exc
    raise FamilyError(f"--state must be memory or a redis:// URL, got {url!r}")
