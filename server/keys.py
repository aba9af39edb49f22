"""The API keys file: keys stored as sha256 hashes, caps per key, re-read when it changes.

    keys:
      - sha256: 5b1f...e2        # sha256 of the bearer key: `family hash-key sk-team-a-...`
        name: team-a
        requests_per_minute: 120 # rate (token bucket per key, per gateway replica)
        max_concurrent: 4        # requests in flight at once (streams count until they end)
        tokens_per_minute: 20000 # token quotas (server.quotas): prompt + completion tokens, reserved before
        tokens_per_day: 2000000  # sending, shared by every replica with --state redis://...
        budget: {max_latency_ms: 3000}              # default budget: a request may override it
        priority: sheddable      # default priority (critical|standard|sheddable): a request may override it
        members: [smollm2-135m-p80, smollm2-135m-p70]  # the only members it may use (pinned or routed)
        cap: {max_memory_gb: 1.6, max_latency_ms: 5000}  # ceiling: a request is narrowed to it
      - sha256: 9c0a...41
        name: ops
        admin: true              # may read /v1/family worker details and /metrics

Why hashes: the file can be handed to whoever deploys the gateway, or checked in, without handing out
the keys. A plain `key:` entry is still read (and hashed at once) so old files keep working.

Rotation without a restart: the gateway re-reads the file when its mtime or size changes (checked at
most once a second, on the request path). Add the new key's hash, hand out the new key, remove the old
hash; a key that stays in the file keeps its rate bucket and in-flight count. A file that no longer
parses is logged and ignored: the keys in force stay in force.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from family.errors import FamilyError
from server.protocol import Budget, Priority

log = logging.getLogger("server.keys")
RELOAD_CHECK_S = 1.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """What the keys file stores for `key` (hex sha256 of its UTF-8 bytes)."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyCap(BaseModel):
    """A budget ceiling: the loosest limits a key's requests may have. A request with a looser limit,
    or none, is narrowed to these; best effort never serves past them."""

    model_config = ConfigDict(extra="forbid")
    max_memory_gb: float | None = Field(default=None, gt=0)
    max_ttft_ms: float | None = Field(default=None, gt=0)
    max_latency_ms: float | None = Field(default=None, gt=0)


class KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str | None = None
    key: str | None = Field(default=None, min_length=8, description="plain key (discouraged): hashed on load")
    name: str
    admin: bool = False
    requests_per_minute: float | None = Field(default=None, gt=0)
    max_concurrent: int | None = Field(default=None, ge=1)
    # Token quotas (server.quotas), shared by every replica with --state redis://...: prompt + completion tokens.
    tokens_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)
    budget: Budget | None = None
    priority: Priority | None = None  # default for its requests (server.priority); the request's own wins
    members: list[str] | None = Field(default=None, min_length=1)
    cap: KeyCap | None = None

    @model_validator(mode="after")
    def _hashed(self):
        if (self.sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of sha256 (preferred) or key")
        if self.key is not None:
            self.sha256, self.key = hash_key(self.key), None  # never kept in memory in the clear
        self.sha256 = self.sha256.lower()
        if not _HEX64.match(self.sha256):
            raise ValueError("sha256 must be 64 hex digits (family hash-key KEY)")
        return self


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeySpec]


def read_keys(path: Path, members: set[str] | None = None) -> list[KeySpec]:
    """Parse and check a keys file; FamilyError in one line when it is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FamilyError(f"api keys file not found: {path}")
    try:
        keys = KeysFile.model_validate(yaml.safe_load(path.read_text()) or {}).keys
    except (yaml.YAMLError, ValidationError) as exc:
        raise FamilyError(f"api keys file {path} is invalid: {' '.join(str(exc).split())[:300]}") from exc
    seen: set[str] = set()
    for k in keys:
        if k.sha256 in seen:
            raise FamilyError(f"api keys file {path}: key {k.name!r} is listed twice")
        seen.add(k.sha256)
        unknown = sorted(set(k.members or ()) - members) if members is not None else []
        if unknown:
            raise FamilyError(f"api keys file {path}: key {k.name!r} lists unknown members {', '.join(unknown)}")
    return keys


class KeyStore:
    """Keys by hash, from a list or a file that is re-read when it changes."""

    def __init__(self, keys: list[KeySpec] | None = None, path: Path | None = None, members: set[str] | None = None):
        self.path, self.members = (Path(path) if path else None), members
        self.by_hash: dict[str, KeySpec] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        if self.path is not None:
            self._stamp = self._stat()
            keys = read_keys(self.path, members)
        self.by_hash = {k.sha256: k for k in keys or []}

    @property
    def enabled(self) -> bool:
        return self.path is not None or bool(self.by_hash)

    def lookup(self, token: str) -> KeySpec | None:
        self.maybe_reload()
        return self.by_hash.get(hash_key(token)) if token else None

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def maybe_reload(self, now: float | None = None) -> bool:
        """Re-read the file if it changed since the last look (at most one look a second). True if reloaded."""
        if self.path is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._checked < RELOAD_CHECK_S:
            return False
        self._checked = now
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            keys = read_keys(self.path, self.members)
        except FamilyError as exc:
            log.error("keeping the keys in force: %s", exc)
            return False
        self._stamp = stamp
        self.by_hash = {k.sha256: k for k in keys}
        log.warning("api keys reloaded from %s: %d keys", self.path, len(keys))
        return True
