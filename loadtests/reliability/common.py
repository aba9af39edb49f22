"""What every reliability scenario shares: a small bounded load generator (threads + httpx; no gevent),
one request with its outcome, and the result dict each scenario returns."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from family.registry import load_family


@dataclass
class Result:
    t: float  # start, seconds since the load began
    stream: bool
    status: int = 0
    e2e_s: float = 0.0
    done: bool = False  # stream ended with [DONE]
    error_event: bool = False  # stream carried an error event
    exception: str | None = None
    member: str | None = None
    worker: str | None = None
    retry_after: str | None = None
    error_type: str | None = None


def one_request(client: httpx.Client, url: str, body: dict, t0: float, timeout: float = 120.0) -> Result:
    res = Result(t=time.perf_counter() - t0, stream=bool(body.get("stream")))
    start = time.perf_counter()
    try:
        with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
            res.status = r.status_code
            res.member, res.worker = r.headers.get("x-family-member"), r.headers.get("x-family-worker")
            res.retry_after = r.headers.get("retry-after")
            if r.status_code != 200:
                try:
                    res.error_type = json.loads(r.read())["error"]["type"]
                except (ValueError, KeyError, TypeError):
                    res.error_type = "unparsable"
            elif res.stream:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        res.done = True
                    elif line.startswith("data:") and '"error"' in line:
                        res.error_event = True
            else:
                json.loads(r.read())["choices"][0]["text"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        res.exception = f"{type(exc).__name__}: {exc}"[:200]
    res.e2e_s = time.perf_counter() - start
    return res


class Load:
    """`threads` callers, each sending requests back to back (alternating streamed and not), until
    stop() or `max_s` seconds or `max_requests` each. Bounded in count and in time."""

    def __init__(self, url: str, body: dict, threads: int = 4, max_s: float = 60, max_requests: int = 200,
                 stream_every: int = 2, timeout: float = 120.0):
        self.url, self.body, self.threads, self.max_s, self.max_requests = url, body, threads, max_s, max_requests
        self.stream_every, self.timeout = stream_every, timeout
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.t0 = 0.0

    def _run(self, k: int) -> None:
        deadline = self.t0 + self.max_s
        with httpx.Client() as client:
            for i in range(self.max_requests):
                if self._stop.is_set() or time.perf_counter() > deadline:
                    return
                body = {**self.body, "stream": (i + k) % self.stream_every == 0}
                r = one_request(client, self.url, body, self.t0, self.timeout)
                with self._lock:
                    self.results.append(r)

    def start(self) -> "Load":
        self.t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.threads)]
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float | None = None) -> list[Result]:
        """Wait until every caller is done (its count or `max_s` reached), at most max_s + `timeout`."""
        deadline = self.t0 + self.max_s + (150 if timeout is None else timeout)
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.perf_counter()))
        return self.results

    def stop(self, join_s: float = 150) -> list[Result]:
        """Stop starting requests; wait for the ones in flight."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=join_s)
        return self.results


def names(family_dir: Path) -> tuple[str, str, list[str]]:
    """(family name, parent member, other servable members smallest first)."""
    fam = load_family(family_dir)
    others = sorted((m for m in fam.servable if not m.is_parent), key=lambda m: m.parameters)
    return fam.registry.name, fam.registry.parent, [m.name for m in others]


def finish(name: str, checks: dict, **details) -> dict:
    """The result: `failed` names the failed checks first, so a cut-short dump of it still says which."""
    failed = [k for k, ok in checks.items() if not ok]
    return {"scenario": name, "ok": not failed, "failed": failed, "checks": checks, **details}


def summary(results: list[Result]) -> dict:
    from collections import Counter

    return {
        "requests": len(results),
        "non_streamed": sum(not r.stream for r in results),
        "streamed": sum(r.stream for r in results),
        "status": dict(Counter(str(r.status) for r in results)),
        "served_by": dict(Counter(r.member or "-" for r in results)),
        "exceptions": [r.exception for r in results if r.exception][:5],
    }
