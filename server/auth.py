"""Optional bearer API keys: who is calling, their default budget and their rate limit.

    keys:
      - key: sk-team-a
        name: team-a
        requests_per_minute: 120
        budget: {max_latency_ms: 3000}
      - key: sk-ops
        name: ops
        admin: true            # may read /v1/family worker details and /metrics

Without a keys file the gateway is open. Rate limits are a token bucket per key, per gateway replica.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from family.errors import FamilyError
from server.errors import APIError
from server.protocol import Budget


class KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=8)
    name: str
    admin: bool = False
    requests_per_minute: float | None = Field(default=None, gt=0)
    budget: Budget | None = None


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeySpec]


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
    def __init__(self, keys: list[KeySpec] | None = None):
        self.keys = {k.key: k for k in keys or []}
        self.buckets = {
            k.key: _Bucket(k.requests_per_minute / 60, max(1.0, k.requests_per_minute / 60), max(1.0, k.requests_per_minute / 60))
            for k in keys or [] if k.requests_per_minute
        }

    @classmethod
    def from_file(cls, path: Path | None) -> "Auth":
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise FamilyError(f"api keys file not found: {path}")
        try:
            return cls(KeysFile.model_validate(yaml.safe_load(path.read_text()) or {}).keys)
        except (yaml.YAMLError, ValidationError) as exc:
            raise FamilyError(f"api keys file {path} is invalid: {str(exc).splitlines()[0]}") from exc

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, authorization: str | None) -> KeySpec | None:
        """The caller's key (None when keys are off); 401 for a missing or unknown key."""
        if not self.enabled:
            return None
        token = (authorization or "").removeprefix("Bearer ").strip()
        spec = self.keys.get(token)
        if spec is None:
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", type="authentication_error", code="invalid_api_key")
        return spec

    def admit(self, spec: KeySpec | None) -> None:
        """429 with Retry-After when the key is over its rate."""
        if spec is None or spec.key not in self.buckets:
            return
        wait = self.buckets[spec.key].take()
        if wait > 0:
            raise APIError(429, f"rate limit of {spec.requests_per_minute:g} requests/minute for {spec.name} exceeded",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(max(1, round(wait)))})

    def require_admin(self, spec: KeySpec | None) -> None:
        if self.enabled and (spec is None or not spec.admin):
            raise APIError(403, "this endpoint needs an admin key", type="permission_error", code="admin_required")
