"""Session and prefix affinity: send a conversation back to the worker that has its prefix cached.

vLLM's automatic prefix caching skips the prefill of a prompt prefix the worker has already seen, but
only on that worker. Requests that share an affinity key go to the same worker while its load allows:

- the key is the `x-session-id` header, else the body's `user`, else, for a prompt of at least
  PREFIX_CHARS characters, its first PREFIX_CHARS characters (a long shared system prompt or document);
  keys are kept hashed, at most MAX_KEYS of them, each for TTL_S after its last use;
- **load guard**: the remembered worker is preferred only when it still fits the budget, serves the
  member the router ranks first, has a free gateway slot, and carries at most `max_extra_load` more
  requests than the least-loaded other worker of that member; past that, normal routing picks, and the
  key moves to the worker that served it;
- **TTFT accounting**: the router predicts the remembered worker's TTFT with the cached prefix left
  out of the prefill (`cached` tokens: the previous prompt of the session, or the shared prefix), on
  workers whose fleet entry says `prefix_caching: true` (vLLM; the torch engine caches nothing).

State is per gateway replica: behind a load balancer without stickiness, a session that lands on
another replica is routed afresh (and keyed there from then on).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from server.metrics import GatewayMetrics
from server.pool import WorkerState
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.router import Choice

SESSION_HEADER = "x-session-id"
PREFIX_CHARS = 512  # a prompt sharing this many leading characters shares a few hundred tokens of prefill
MAX_KEYS = 10_000
TTL_S = 600.0
DEFAULT_MAX_EXTRA_LOAD = 2.0


@dataclass(frozen=True)
class AffinityKey:
    kind: str  # "session", "user", "prefix"
    digest: str
    prefix_share: float = 1.0  # for "prefix": the share of the prompt that is the shared prefix


def prompt_text(body: ChatCompletionRequest | CompletionRequest) -> str:
    if isinstance(body, ChatCompletionRequest):
        return "".join(f"{m.role}\n{m.text()}\n" for m in body.messages)
    return body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)


def affinity_key(body: ChatCompletionRequest | CompletionRequest, request: Request) -> AffinityKey | None:
    def digest(kind: str, value: str) -> str:
        return hashlib.sha256(f"{kind}\0{value}".encode()).hexdigest()[:32]

    session = request.headers.get(SESSION_HEADER)
    if session:
        return AffinityKey("session", digest("session", session))
    if body.user:
        return AffinityKey("user", digest("user", body.user))
    text = prompt_text(body)
    if len(text) >= PREFIX_CHARS:
        return AffinityKey("prefix", digest("prefix", text[:PREFIX_CHARS]), PREFIX_CHARS / len(text))
    return None


@dataclass
class _Entry:
    worker: str
    member: str
    prompt_tokens: int  # the last prompt sent there under this key
    stamp: float


class Affinity:
    """Key → the worker that last served it (LRU with a TTL), and the load guard."""

    def __init__(self, metrics: GatewayMetrics, enabled: bool = True, max_extra_load: float = DEFAULT_MAX_EXTRA_LOAD,
                 max_keys: int = MAX_KEYS, ttl_s: float = TTL_S):
        self.metrics, self.enabled, self.max_extra_load = metrics, enabled, max_extra_load
        self.max_keys, self.ttl_s = max_keys, ttl_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def _lookup(self, key: AffinityKey | None) -> _Entry | None:
        if not self.enabled or key is None:
            return None
        e = self._entries.get(key.digest)
        if e is None:
            return None
        if time.monotonic() - e.stamp > self.ttl_s:
            del self._entries[key.digest]
            return None
        return e

    def cached(self, key: AffinityKey | None, prompt_tokens: dict[str, int]) -> dict[tuple[str, str], int] | None:
        """(worker, member) → prompt tokens it likely holds for this request (for the router's TTFT
        prediction; a worker serving several members caches each one's prefixes apart)."""
        e = self._lookup(key)
        if e is None or e.member not in prompt_tokens:
            return None
        p = prompt_tokens[e.member]
        shared = p * key.prefix_share if key.kind == "prefix" else e.prompt_tokens
        return {(e.worker, e.member): int(min(p, shared))}

    def prefer(self, key: AffinityKey | None, choices: list[Choice], free: Callable[[WorkerState], bool]) -> list[Choice]:
        """`choices` with the key's worker first when the load guard allows it."""
        if not self.enabled or key is None or not choices:
            return choices
        e = self._lookup(key)
        if e is None:
            self.metrics.affinity.labels("new").inc()
            return choices
        best = choices[0].member.name
        mine = next((c for c in choices if c.worker.name == e.worker and c.member.name == e.member == best), None)
        if mine is None:  # its worker is out, no longer fits the budget, or serves a less accurate member than the best fit
            self.metrics.affinity.labels("unfit").inc()
            return choices
        peers = [c.worker.load() for c in choices if c.member.name == mine.member.name and c.worker is not mine.worker]
        if not free(mine.worker) or (peers and mine.worker.load() > min(peers) + self.max_extra_load):
            self.metrics.affinity.labels("load_guard").inc()
            return choices
        self.metrics.affinity.labels("hit").inc()
        return [mine] + [c for c in choices if c is not mine]

    def remember(self, key: AffinityKey | None, choice: Choice, prompt_tokens: int) -> None:
        if not self.enabled or key is None:
            return
        self._entries[key.digest] = _Entry(choice.worker.name, choice.member.name, prompt_tokens, time.monotonic())
        self._entries.move_to_end(key.digest)
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)
