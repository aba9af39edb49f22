"""Poison-request isolation: tell a failing worker from a request that fails wherever it goes.

A worker that is down (connection refused or reset, a timeout, failing health checks) is the pool's
business: cooldown. An HTTP 5xx with a body is an answer, and on its own says nothing about who is at
fault. So, per request (`Attempts`):

- the first 5xx makes the worker a suspect (an immediate health check, no cooldown) and the request
  is retried on one other worker;
- if another worker serves it, each worker that failed it earns a strike (server.pool: repeated
  strikes from different requests mean the worker is at fault);
- a second 5xx ends the request: it is the likely cause. The caller gets a 400 naming the request
  (and what the workers said), nobody is cooled down, and `family_poison_requests_total` counts it.
"""

from __future__ import annotations

import json

from server.errors import APIError
from server.metrics import GatewayMetrics
from server.pool import Pool, WorkerState

MAX_SERVER_ERRORS = 2  # the first on one worker, the retry on one other


class Attempts:
    """One request's HTTP 5xx answers and what they say about the workers that gave them."""

    def __init__(self, pool: Pool, metrics: GatewayMetrics):
        self.pool, self.metrics = pool, metrics
        self.failed: list[tuple[WorkerState, int, str]] = []  # worker, status, what it said

    def server_error(self, w: WorkerState, status: int, content: bytes, member: str) -> None:
        """Record a 5xx; raise the caller's 400 when it is the second."""
        self.failed.append((w, status, _message(content)))
        self.pool.suspect(w, f"HTTP {status}")
        if len(self.failed) >= MAX_SERVER_ERRORS:
            self.metrics.poison.labels(member).inc()
            raise self.poison_error()

    def served(self) -> None:
        """Another worker took the request: the ones that failed it were at fault this time."""
        for w, status, _ in self.failed:
            self.pool.strike(w, f"HTTP {status}")
        self.failed.clear()

    def poison_error(self) -> APIError:
        said = "; ".join(f"HTTP {status}: {msg}" for _, status, msg in self.failed)
        return APIError(
            400,
            f"this request failed on {len(self.failed)} different workers ({said}); the request itself is the likely "
            "cause, so it was not retried further and no worker was taken out of rotation. Check its fields.",
            param=None,
            code="request_failed_on_workers",
        )


def _message(content: bytes, limit: int = 200) -> str:
    """The worker's error message (OpenAI or FastAPI shape), else the start of its body."""
    try:
        data = json.loads(content)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message") or err.get("detail") if isinstance(err, dict) else err
        text = str(msg if msg is not None else data)
    except (ValueError, AttributeError):
        text = content[:limit].decode(errors="replace")
    text = " ".join(text.split())
    return text[:limit] or "(empty body)"
