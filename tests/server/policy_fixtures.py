"""Fixtures for the routing-policy tests (issue 12: priorities, affinity, deadlines), all real HTTP on
loopback: real torch workers on the tiny family, optionally behind loadtests.slowproxy (a real reverse
proxy that delays a response's start and every streamed line, so a request holds its worker slot for
a known time, or a worker stalls before its first token), and the gateway in front."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai

from family.registry import load_family
from loadtests.slowproxy import create_app as slow_proxy
from server.fleet import WorkerSpec
from server.gateway import create_app
from server.worker_torch import create_app as create_worker
from tests.server.conftest import serve
from tests.server.gateway_fixtures import DEVICE


@dataclass
class W:
    """One worker of the test fleet: its member, a slow proxy in front ({"delay_s", "per_chunk_s"}) or
    not, and extra WorkerSpec fields (max_concurrent, prefix_caching)."""

    member: str
    slow: dict | None = None
    spec: dict = field(default_factory=dict)


@contextlib.contextmanager
def policy_fleet(family_root, workers: list[W], **gateway_kwargs):
    """Yield (gateway url, openai client, the URL the gateway calls for each worker, in order)."""
    fam = load_family(family_root)
    with contextlib.ExitStack() as stack:
        specs = []
        for w in workers:
            url = stack.enter_context(serve(create_worker(fam.member_dir(w.member), w.member, max_model_len=1024, max_batch=8)))
            if w.slow is not None:
                url = stack.enter_context(serve(slow_proxy(url, w.slow.get("delay_s", 0.0), w.slow.get("per_chunk_s", 0.0))))
            specs.append(WorkerSpec(url=url, member=w.member, device_class=DEVICE, **w.spec))
        gw = stack.enter_context(serve(create_app(fam, specs, health_interval=0.3, **gateway_kwargs)))
        wait_until(lambda: httpx.get(f"{gw}/health").json()["healthy_workers"] == len(specs), 20, "workers healthy")
        yield gw, openai.OpenAI(base_url=f"{gw}/v1", api_key="none", max_retries=0), [s.base for s in specs]


def workers_state(url: str, headers: dict | None = None) -> dict[str, dict]:
    return {w["url"]: w for w in httpx.get(f"{url}/v1/family", headers=headers).json()["workers"]}


def metric(url: str, prefix: str, headers: dict | None = None) -> float:
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass
class Outcome:
    status: int = 0
    headers: dict = field(default_factory=dict)
    body: str = ""
    start: float = 0.0
    end: float = 0.0
    done: bool = False  # a stream ended with [DONE]

    @property
    def elapsed(self) -> float:
        return self.end - self.start

    @property
    def member(self) -> str | None:
        return self.headers.get("x-family-member")

    @property
    def worker(self) -> str | None:
        return self.headers.get("x-family-worker")


def request(url: str, body: dict, headers: dict | None = None, path: str = "/v1/completions", timeout: float = 60) -> Outcome:
    """One request over httpx (streamed when the body says so), with its status, headers and timing."""
    out = Outcome(start=time.monotonic())
    with httpx.Client(timeout=timeout) as c, c.stream("POST", f"{url}{path}", json=body, headers=headers or {}) as r:
        out.status, out.headers = r.status_code, dict(r.headers)
        lines = list(r.iter_lines())
        out.body = "\n".join(lines)
        out.done = "data: [DONE]" in lines
    out.end = time.monotonic()
    return out


def in_background(url: str, body: dict, headers: dict | None = None) -> tuple[threading.Thread, Outcome]:
    """Start `request` in a thread; the Outcome fills in when it ends."""
    out = Outcome()

    def run() -> None:
        res = request(url, body, headers)
        out.__dict__.update(res.__dict__)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


class Hold:
    """A streamed request that holds its worker slot until `release()` (the client closes the stream,
    as a caller that goes away does), or until it ends by itself. Behind a slow proxy its natural end
    is far off, so what a test sees does not depend on how busy the machine is."""

    def __init__(self, url: str, body: dict, headers: dict | None = None):
        self.out = Outcome()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, body, headers or {}), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict, headers: dict) -> None:
        self.out.start = time.monotonic()
        with httpx.Client(timeout=120) as c, c.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            self.out.status, self.out.headers = r.status_code, dict(r.headers)
            for line in r.iter_lines():
                self.out.done = self.out.done or line == "data: [DONE]"
                if self._release.is_set():
                    break
        self.out.end = time.monotonic()

    def release(self, timeout: float = 30) -> Outcome:
        self._release.set()
        self._thread.join(timeout)
        return self.out
