"""The upstream pool: every worker's health, load and observed speed, kept current in the background.

Health: GET /health every `interval` seconds; a refused connection, two failed checks in a row, or a
connection error / timeout on a real request put the worker in cooldown; each further failed *request*
doubles it, up to `max_cooldown`; it returns to rotation when a health check passes after the
cooldown. Checks that keep failing while a worker is already out do not lengthen its cooldown: a
restarted worker is back within one check interval of answering, not a minute later.

An HTTP 5xx *with a body* is different: the worker is up and answered, and the request may be what
failed (issue 13: one request with an out-of-range seed took three of four workers out). By itself it
only earns the worker an immediate health check (`suspect`). When another worker then serves the same
request, the failing one gets a strike (`strike`); STRIKES strikes from different requests within
STRIKE_WINDOW_S put it in cooldown. A request that fails on two workers strikes neither
(server.isolation). Load: running and waiting requests read from the worker's
/metrics (vLLM's names, which both engines expose), plus the gateway's own in-flight count. Speed:
an EWMA of observed/predicted time to first token and time per token, which corrects the registry's
latency model for what this worker is doing right now. It fades back towards 1 (the registry's own
figure) with a half-life of RATIO_HALF_LIFE_S while nothing is observed: a worker judged too slow
gets no traffic, so without fading nothing would ever show it is fast again (a load test shed every
tight request for the rest of its run once a burst had raised the ratio).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field

import aiohttp
import yarl

from server.fleet import WorkerSpec
from server.metrics import GatewayMetrics

log = logging.getLogger("server.pool")

# Load gauges with their labels: a worker serving several members labels each one's by model_name.
_GAUGE = re.compile(r'^(vllm:num_requests_(?:running|waiting))\{([^}]*)\}\s+([0-9.eE+-]+)', re.M)
_MODEL = re.compile(r'model_name="([^"]*)"')
EWMA = 0.3
RATIO_HALF_LIFE_S = 10.0  # an observed ratio's excess over 1 halves in this long without new observations
CHECK_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
FAILED_CHECKS = 2
STRIKES = 3  # HTTP 5xx on this many different requests that other workers served ...
STRIKE_WINDOW_S = 60.0  # ... within this long: the worker is at fault, not the requests
# What a dead, unreachable, slow or misbehaving upstream raises (aiohttp's timeouts are asyncio's too).
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ValueError)


@dataclass
class Speed:
    """Observed / predicted TTFT and TPOT of one kind of request on one worker."""

    ttft: float = 1.0
    tpot: float = 1.0
    at: float | None = None  # when last observed (time.monotonic); None: never, nothing to fade

    def ratios(self, now: float | None = None) -> tuple[float, float]:
        """The ratios now: their excess over 1 halves every RATIO_HALF_LIFE_S since the last observation."""
        if self.at is None:
            return self.ttft, self.tpot
        fade = 0.5 ** (max(0.0, (time.monotonic() if now is None else now) - self.at) / RATIO_HALF_LIFE_S)
        return 1 + (self.ttft - 1) * fade, 1 + (self.tpot - 1) * fade

    def observe(self, predicted_ttft: float | None, ttft: float | None, predicted_tpot: float | None, tpot: float | None,
                now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.ttft, self.tpot = self.ratios(now)
        if predicted_ttft and ttft is not None:
            self.ttft = _clamp((1 - EWMA) * self.ttft + EWMA * ttft / predicted_ttft)
        if predicted_tpot and tpot is not None:
            self.tpot = _clamp((1 - EWMA) * self.tpot + EWMA * tpot / predicted_tpot)
        self.at = now


@dataclass
class WorkerState:
    spec: WorkerSpec
    healthy: bool = False
    cooldown_until: float = 0.0
    failures: int = 0  # failures since it was last healthy (the cooldown doubles with each)
    failed_checks: int = 0  # health checks failed in a row
    running: float = 0.0
    waiting: float = 0.0
    in_flight: int = 0
    first_in_flight: int = 0  # of those, served deadline first (server.deadline_scheduling): the ones such a request waits for
    speed: Speed = field(default_factory=Speed)
    # The same for requests it serves deadline first: they wait for no one, the rest wait for them, so
    # one ratio for both would mislead the predictions of each.
    first_speed: Speed = field(default_factory=Speed)
    last_error: str | None = None
    strikes: list[float] = field(default_factory=list)  # when it failed a request another worker served
    cooldowns: int = 0  # times put in cooldown (read by the hostile-input scenario)
    headers: dict[str, str] = field(default_factory=dict)  # sent upstream with every request

    def __post_init__(self) -> None:
        self.headers = {"content-type": "application/json"}
        if self.spec.api_key:
            self.headers["authorization"] = f"Bearer {self.spec.api_key}"
        # Read many times per request (routing, metrics labels, the upstream URL): made once, since
        # str(HttpUrl) and URL parsing cost more than everything else these lines do.
        self._name = self.spec.base
        self._urls: dict[str, yarl.URL] = {}

    @property
    def name(self) -> str:
        return self._name

    def url(self, path: str) -> yarl.URL:
        """The worker's URL for `path`, parsed once (aiohttp takes it as is)."""
        u = self._urls.get(path)
        if u is None:
            u = self._urls[path] = yarl.URL(f"{self._name}{path}")
        return u

    def available(self, now: float | None = None) -> bool:
        return self.healthy and (now or time.monotonic()) >= self.cooldown_until

    def load(self) -> float:
        """Requests this worker is busy with: its own count, or ours when its /metrics lag behind."""
        return max(self.running + self.waiting, float(self.in_flight))

    def observe(self, predicted_ttft: float | None, ttft: float | None, predicted_tpot: float | None, tpot: float | None,
                first: bool = False) -> None:
        """Fold one request's observed/predicted times into the ratios (`first`: it was served deadline first)."""
        (self.first_speed if first else self.speed).observe(predicted_ttft, ttft, predicted_tpot, tpot)

    def ratios(self, first: bool = False) -> tuple[float, float]:
        """(TTFT, TPOT) observed/predicted now, for requests served deadline first or the rest."""
        return (self.first_speed if first else self.speed).ratios()

    def public(self) -> dict:
        (ttft_ratio, tpot_ratio), (first_ttft, first_tpot) = self.ratios(), self.ratios(first=True)
        return {
            "url": self.name, "member": self.spec.member, "device_class": self.spec.device_class,
            "healthy": self.healthy, "in_cooldown": time.monotonic() < self.cooldown_until, "running": self.running,
            "waiting": self.waiting, "in_flight": self.in_flight, "first_in_flight": self.first_in_flight,
            "ttft_ratio": round(ttft_ratio, 3), "tpot_ratio": round(tpot_ratio, 3), "first_ttft_ratio": round(first_ttft, 3),
            "first_tpot_ratio": round(first_tpot, 3), "last_error": self.last_error,
            "strikes": len(self.strikes), "cooldowns": self.cooldowns,
        }


def _load_of(text: str, member: str) -> dict[str, float]:
    """The load gauges of `member` in a worker's /metrics: its own lines where the worker labels them
    per member (a shared worker), else the worker's (a single-member worker, or vLLM's served name)."""
    mine: dict[str, float] = {}
    anyone: dict[str, float] = {}
    for name, labels, value in _GAUGE.findall(text):
        anyone[name] = float(value)
        model = _MODEL.search(labels)
        if model and model.group(1) == member:
            mine[name] = float(value)
    return mine or anyone


def _clamp(x: float) -> float:
    return min(10.0, max(0.1, x))


class Pool:
    def __init__(self, specs: list[WorkerSpec], session: aiohttp.ClientSession | None, metrics: GatewayMetrics,
                 interval: float = 2.0, base_cooldown: float = 2.0, max_cooldown: float = 60.0):
        self.workers = [WorkerState(s) for s in specs]
        self._by_member: dict[str, list[WorkerState]] = {}
        self._by_url: dict[str, list[WorkerState]] = {}  # one worker process serving several members
        for w in self.workers:
            self._by_member.setdefault(w.spec.member, []).append(w)
            self._by_url.setdefault(w.name, []).append(w)
        self.session = session
        self.metrics = metrics
        self.interval, self.base_cooldown, self.max_cooldown = interval, base_cooldown, max_cooldown
        self._task: asyncio.Task | None = None
        self._probes: dict[tuple[str, str], asyncio.Task] = {}  # immediate health checks of suspects, by (worker, member)

    def for_member(self, member: str) -> list[WorkerState]:
        return self._by_member.get(member, [])

    def siblings(self, w: WorkerState) -> list[WorkerState]:
        """The other members' states on `w`'s worker process (the same URL)."""
        return [s for s in self._by_url.get(w.name, []) if s is not w]

    def fail(self, w: WorkerState, reason: str) -> None:
        """A failed request or check: out of rotation for a growing cooldown."""
        w.failures += 1
        w.cooldowns += 1
        w.last_error = reason
        w.cooldown_until = time.monotonic() + min(self.max_cooldown, self.base_cooldown * 2 ** (w.failures - 1))
        self.metrics.worker_up.labels(w.name, w.spec.member).set(0)

    def suspect(self, w: WorkerState, reason: str) -> None:
        """It answered one request with an HTTP 5xx: check its health now, keep it in rotation meanwhile."""
        w.last_error = reason
        key = (w.name, w.spec.member)
        if key not in self._probes:
            task = asyncio.create_task(self.check(w))
            self._probes[key] = task
            task.add_done_callback(lambda _t: self._probes.pop(key, None))

    def strike(self, w: WorkerState, reason: str, now: float | None = None) -> bool:
        """It failed a request that another worker served. True if that put it in cooldown."""
        now = time.monotonic() if now is None else now
        w.strikes = [t for t in w.strikes if now - t < STRIKE_WINDOW_S] + [now]
        self.metrics.strikes.labels(w.name).inc()
        if len(w.strikes) < STRIKES:
            return False
        w.strikes.clear()
        self.fail(w, f"{reason} on {STRIKES} different requests that other workers served")
        return True

    async def check(self, w: WorkerState) -> None:
        try:
            async with self.session.get(f"{w.name}/health", headers=w.headers, timeout=CHECK_TIMEOUT) as r:
                if r.status != 200:
                    raise ValueError(f"HTTP {r.status}")
            async with self.session.get(f"{w.name}/metrics", headers=w.headers, timeout=CHECK_TIMEOUT) as m:
                text = await m.text() if m.status == 200 else ""
            values = _load_of(text, w.spec.member)
            w.running = values.get("vllm:num_requests_running", 0.0)
            w.waiting = values.get("vllm:num_requests_waiting", 0.0)
        except UPSTREAM_ERRORS as exc:
            w.failed_checks += 1
            reason = f"health check failed: {type(exc).__name__} {exc}".strip()
            if not w.healthy and w.failures:  # already out: keep probing, without pushing its return back
                w.last_error = reason
                return
            # Refused: the worker is gone. Slow or erroring: out after FAILED_CHECKS in a row, not one blip.
            if isinstance(exc, aiohttp.ClientConnectorError) or w.failed_checks >= FAILED_CHECKS or not w.healthy:
                w.healthy = False
                self.fail(w, reason)
            return
        w.failed_checks = 0
        if time.monotonic() >= w.cooldown_until:
            w.healthy, w.failures, w.last_error = True, 0, None
            self.metrics.worker_up.labels(w.name, w.spec.member).set(1)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.workers))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:  # never let the health loop die
                log.exception("health check round failed")

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
