"""Optional bearer API keys: who is calling, how fast and how much at once they may call.

The keys file and what a key may hold are `server.keys`; what a key may use (members, a budget
ceiling) is applied by `server.caps`. Here: identify the caller (401), their rate (a token bucket per
key, per gateway replica: 429 with Retry-After) and their concurrency (requests in flight at once,
streams until they end: 429 too). Without a keys file the gateway is open.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import APIError
from server.keys import KeySpec, KeyStore


@dataclass
class _Bucket:
    rate_per_s: float
    capacity: float
    tokens: float
    stamp: float = field(default_factory=time.monotonic)

    def take(self) -> float:
        """0 if a request may go now, else seconds until it may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_per_s


class Auth:
    def __init__(self, keys: list[KeySpec] | None = None, *, store: KeyStore | None = None):
        self.store = store or KeyStore(keys)
        self._buckets: dict[str, tuple[float, _Bucket]] = {}  # key hash → (its rate when made, bucket)
        self._in_flight: dict[str, int] = {}

    @classmethod
    def from_file(cls, path: Path | None, members: set[str] | None = None) -> "Auth":
        """Keys from `path` (re-read when it changes); `members`: the names a key's `members` may list."""
        return cls() if path is None else cls(store=KeyStore(path=path, members=members))

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    def identify(self, authorization: str | None) -> KeySpec | None:
        """The caller's key (None when keys are off); 401 for a missing or unknown key."""
        if not self.enabled:
            return None
        token = (authorization or "").removeprefix("Bearer ").strip()
        spec = self.store.lookup(token)
        if spec is None:
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", type="authentication_error", code="invalid_api_key")
        return spec

    def admit(self, spec: KeySpec | None) -> None:
        """429 with Retry-After when the key is over its rate."""
        if spec is None or not spec.requests_per_minute:
            return
        rate = spec.requests_per_minute / 60
        held = self._buckets.get(spec.sha256)
        if held is None or held[0] != rate:  # new key, or its rate changed in the file
            burst = max(1.0, rate)
            held = self._buckets[spec.sha256] = (rate, _Bucket(rate, burst, burst))
        wait = held[1].take()
        if wait > 0:
            raise APIError(429, f"rate limit of {spec.requests_per_minute:g} requests/minute for {spec.name} exceeded",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(max(1, round(wait)))})

    def acquire(self, spec: KeySpec | None) -> Callable[[], None]:
        """Take one of the key's concurrent slots (429 when none is free); returns the call that gives it back."""
        if spec is None or spec.max_concurrent is None:
            return _nothing
        h = spec.sha256
        if self._in_flight.get(h, 0) >= spec.max_concurrent:
            raise APIError(429, f"{spec.name} already has {spec.max_concurrent} requests in flight (its concurrency limit)",
                           type="rate_limit_error", code="concurrency_limit_exceeded", headers={"Retry-After": "1"})
        self._in_flight[h] = self._in_flight.get(h, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._in_flight[h] -= 1

        return release

    def require_admin(self, spec: KeySpec | None) -> None:
        if self.enabled and (spec is None or not spec.admin):
            raise APIError(403, "this endpoint needs an admin key", type="permission_error", code="admin_required")


def _nothing() -> None:
    pass
