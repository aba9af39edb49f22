"""Locust users with mixed budgets against the family gateway.

Four user classes, one per budget class (tight latency, tight memory, high accuracy, none; see
loadtests/budgets.py): streaming and non-streaming, chat and text completions, prompts cut from
held-out WikiText-2. Each request carries its own budget, so the report can tell whether *it* met it.

Besides locust's own request statistics (named ``<policy>:<class>``), every request fires
- ``events.request`` with request_type ``TTFT`` and ``TPOT`` (time to first token, time per output
  token after the first, streamed requests only), so the locust UI/CSV shows them per budget class;
- ``family_request``, a custom event carrying the whole :class:`loadtests.budgets.Outcome`
  (budget, served member, met or not), which loadtests/run.py collects for the goodput report.

Run headless through ``python -m loadtests.run`` (library API), or with the locust CLI:

    FAMILY_LT_POLICY=gateway locust -f loadtests/locustfile.py --headless -u 8 -r 4 -t 60s \
        --host http://127.0.0.1:8000
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time

import requests
from locust import User, events, task
from locust.event import EventHook

from loadtests.budgets import ClassSpec, Figures, Outcome, Prompts, derive_classes, judge, load_classes, plan

family_request = EventHook()
"""Fired once per request with `outcome=` an Outcome (judged against its own budget)."""


class Scenario:
    """What every user needs: the policy, the family's figures, the budget classes, the prompts."""

    def __init__(self, host: str, policy: str, figures: Figures, classes: list[ClassSpec], *, seed: int = 0,
                 timeout: float = 120.0, api_key: str | None = None, rate_per_user: float = 0.5):
        self.rate_per_user = rate_per_user
        self.host, self.policy, self.figures, self.timeout, self.api_key = host.rstrip("/"), policy, figures, timeout, api_key
        self.classes = {c.name: c for c in classes}
        self.prompts = Prompts(seed=seed)
        self.seed = seed
        self.t0 = time.perf_counter()


SCENARIO: Scenario | None = None
_USER_IDS = itertools.count()


def configure(scenario: Scenario) -> None:
    global SCENARIO
    SCENARIO = scenario


@events.test_start.add_listener
def _from_environment(environment, **_kw) -> None:
    """Locust CLI use: build the scenario from --host and FAMILY_LT_* variables if run.py did not."""
    if SCENARIO is not None:
        return
    host = environment.host or os.environ.get("FAMILY_LT_GATEWAY", "http://127.0.0.1:8000")
    fig = Figures.from_gateway(host, os.environ.get("FAMILY_LT_DEVICE_CLASS"), os.environ.get("FAMILY_LT_API_KEY"))
    classes_file = os.environ.get("FAMILY_LT_CLASSES")
    classes = load_classes(classes_file) if classes_file else derive_classes(fig)
    configure(Scenario(host, os.environ.get("FAMILY_LT_POLICY", "gateway"), fig, classes,
                       api_key=os.environ.get("FAMILY_LT_API_KEY"), rate_per_user=float(os.environ.get("FAMILY_LT_RATE", "0.5"))))


def _content(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return (c.get("delta") or {}).get("content") or c.get("text") or ""


def send(session: requests.Session, sc: Scenario, req) -> Outcome:
    """Send one planned request and time it: TTFT at the first content token, TPOT after it."""
    headers = {"Authorization": f"Bearer {sc.api_key}"} if sc.api_key else {}
    o = Outcome(sc.policy, req.cls, req.budget, req.model, req.chat, req.stream, req.max_tokens,
                start=time.perf_counter() - sc.t0, status=0, e2e_ms=0.0)
    start = time.perf_counter()
    first = last = None
    try:
        with session.post(sc.host + req.path(), json=req.body(), headers=headers, stream=req.stream, timeout=sc.timeout) as r:
            o.status = r.status_code
            o.member, o.worker = r.headers.get("x-family-member"), r.headers.get("x-family-worker")
            if r.headers.get("x-family-predicted-latency-ms"):
                o.predicted_latency_ms = float(r.headers["x-family-predicted-latency-ms"])
            if r.status_code != 200:
                try:
                    o.error_type = r.json()["error"]["type"]
                except (ValueError, KeyError, TypeError):
                    o.error_type = f"http_{r.status_code}"
            elif req.stream:
                chunks = 0
                for line in r.iter_lines(chunk_size=None, decode_unicode=True):
                    if not line or not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        o.done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        o.error_type = "stream_error"
                        continue
                    if chunk.get("usage"):
                        o.tokens, o.prompt_tokens = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
                    if _content(chunk):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks += 1
                o.tokens = o.tokens or chunks
                if not o.done:
                    o.error_type = o.error_type or "stream_error"
            else:
                body = r.json()
                o.tokens, o.prompt_tokens = body["usage"]["completion_tokens"], body["usage"]["prompt_tokens"]
    except requests.Timeout:
        o.error_type = "timeout"
    except requests.RequestException as exc:
        o.error_type = f"connection:{type(exc).__name__}"
    end = time.perf_counter()
    o.e2e_ms = (end - start) * 1e3
    if first is not None:
        o.ttft_ms = (first - start) * 1e3
        if o.tokens > 1 and last is not None:
            o.tpot_ms = (last - first) * 1e3 / (o.tokens - 1)
    return judge(o, sc.figures)


class FamilyUser(User):
    """One caller of a budget class; `budget_class` names it.

    Paced, not closed-loop: each user starts a request every 1/`rate_per_user` seconds on average
    (±30% jitter), or right after the previous one if that took longer. So a policy that rejects fast
    does not get to send more requests than one that serves slowly: every policy sees the same offered
    load unless it is too slow to keep up."""

    abstract = True
    budget_class = "none"

    def wait_time(self) -> float:
        period = 1.0 / max(1e-6, SCENARIO.rate_per_user if SCENARIO else 0.5)
        period *= self.rng.uniform(0.7, 1.3)
        return max(0.0, period - (time.perf_counter() - getattr(self, "_started", 0.0)))

    def on_start(self) -> None:
        self.session = requests.Session()
        self.rng = random.Random(f"{SCENARIO.seed if SCENARIO else 0}-{self.budget_class}-{next(_USER_IDS)}")

    def on_stop(self) -> None:
        self.session.close()

    @task
    def one_request(self) -> None:
        self._started = time.perf_counter()
        sc = SCENARIO
        spec = sc.classes.get(self.budget_class)
        if spec is None:
            return
        req = plan(spec, sc.policy, sc.figures, sc.prompts, self.rng)
        o = send(self.session, sc, req)
        name = f"{sc.policy}:{spec.name}"
        exc = None if o.status == 200 and not o.error_type else RuntimeError(f"{o.status} {o.error_type}")
        ev = self.environment.events.request
        ev.fire(request_type="POST", name=name, response_time=o.e2e_ms, response_length=o.tokens, exception=exc,
                context={"member": o.member, "met": o.met})
        if o.ttft_ms is not None:
            ev.fire(request_type="TTFT", name=name, response_time=o.ttft_ms, response_length=0, exception=None, context={})
        if o.tpot_ms is not None:
            ev.fire(request_type="TPOT", name=name, response_time=o.tpot_ms, response_length=0, exception=None, context={})
        family_request.fire(outcome=o)


class TightLatencyUser(FamilyUser):
    budget_class = "tight_latency"
    weight = 3


class TightMemoryUser(FamilyUser):
    budget_class = "tight_memory"
    weight = 2


class HighAccuracyUser(FamilyUser):
    budget_class = "high_accuracy"
    weight = 2


class NoBudgetUser(FamilyUser):
    budget_class = "none"
    weight = 2


USER_CLASSES = [TightLatencyUser, TightMemoryUser, HighAccuracyUser, NoBudgetUser]
