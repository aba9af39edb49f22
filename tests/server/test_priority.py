"""Priority classes and admission control through real HTTP (issue 12, item 1): real torch workers on
the tiny family behind real slow proxies (so a request holds its worker slot for a known ~12 s), the
gateway with one slot per worker, static routing (the budget table's member order, no live load)."""

from __future__ import annotations

import httpx
import pytest

from server.auth import Auth
from server.keys import KeySpec
from server.priority import RoutingPolicy
from server.protocol import CompletionRequest
from tests.server.gateway_fixtures import tiny_family  # noqa: F401  (fixture)
from tests.server.policy_fixtures import W, in_background, metric, policy_fleet, request, wait_until, workers_state

SLOW = {"per_chunk_s": 0.2}  # every streamed line 0.2 s: a 60-token stream holds its slot ~12 s (steps take seconds on a busy machine)
HOLD = {"prompt": "hold", "max_tokens": 60, "ignore_eos": True, "stream": True}
SHORT = {"model": "tiny", "prompt": "a", "max_tokens": 2}
ALL = [W("tiny-p100", SLOW), W("tiny-p80", SLOW), W("tiny-p60", SLOW)]


def _hold(url: str, model: str, worker: str):
    """A stream that holds `worker`'s only slot for ~12 s; returns once the gateway counts it."""
    t, out = in_background(url, {"model": model, **HOLD})
    wait_until(lambda: workers_state(url)[worker]["in_flight"] >= 1, 10, f"a request in flight on {worker}")
    return t, out


@pytest.mark.slow  # ~12 s holds: 25-30 s per test on a busy 2-core machine
def test_sheddable_downshifts_then_is_shed_with_retry_after_and_critical_keeps_its_member(tiny_family):
    policy = RoutingPolicy(worker_slots=1, sheddable_wait_s=0.3, max_wait_s=8)
    with policy_fleet(tiny_family, ALL, live=False, policy=policy) as (url, _, (p100, p80, p60)):
        held = [_hold(url, "tiny", p100)]  # routed, no budget: the parent
        assert held[0][1].member in (None, "tiny-p100")

        # The parent is saturated: sheddable goes to the smallest member that fits, standard to the next best.
        r = request(url, {**SHORT, "priority": "sheddable"})
        assert r.status == 200 and r.member == "tiny-p60" and r.headers["x-family-route"] == "downshift", (r.status, r.headers)
        r = request(url, SHORT, headers={"x-priority": "sheddable"})
        assert r.status == 200 and r.member == "tiny-p60"
        r = request(url, SHORT)
        assert r.status == 200 and r.member == "tiny-p80" and r.headers["x-family-route"] == "best"

        # Every fitting worker saturated: sheddable waits briefly, then a 429 with Retry-After (not a timeout).
        held += [_hold(url, "tiny-p80", p80), _hold(url, "tiny-p60", p60)]
        r = request(url, {**SHORT, "priority": "sheddable"})
        assert r.status == 429 and r.headers.get("retry-after"), (r.status, r.body)
        assert httpx.Response(429, content=r.body).json()["error"]["code"] == "shed"
        assert r.elapsed < 2.0

        # Critical keeps its member: it waits for the parent's slot instead of moving to a free smaller one.
        r = request(url, {**SHORT, "priority": "critical"})
        assert r.status == 200 and r.member == "tiny-p100", (r.status, r.body)
        for t, out in held:
            t.join(30)
            assert out.status == 200 and out.done
        assert metric(url, "family_downshifts_total") == 2
        assert metric(url, 'family_sheds_total{reason="wait_expired"}') == 1
        assert metric(url, 'family_admitted_total{how="queued",priority="critical"}') == 1


@pytest.mark.slow
def test_critical_takes_the_place_of_a_sheddable_request_waiting_in_the_queue(tiny_family):
    policy = RoutingPolicy(worker_slots=1, sheddable_wait_s=6, max_wait_s=8, max_queue=1)
    with policy_fleet(tiny_family, ALL, live=False, policy=policy) as (url, _, workers):
        held = [_hold(url, m, w) for m, w in zip(("tiny-p100", "tiny-p80", "tiny-p60"), workers)]
        t_shed, shed = in_background(url, {**SHORT, "priority": "sheddable"})
        wait_until(lambda: metric(url, "family_queue_waiting") == 1, 10, "the sheddable request queued")
        t_crit, crit = in_background(url, {**SHORT, "priority": "critical"})
        t_shed.join(10)
        assert shed.status == 429 and shed.headers.get("retry-after") and shed.elapsed < 5, (shed.status, shed.elapsed)
        t_crit.join(30)
        assert crit.status == 200 and crit.member == "tiny-p100"
        for t, _ in held:
            t.join(30)
        assert metric(url, 'family_sheds_total{reason="evicted"}') == 1


def test_priority_from_the_key_the_header_and_the_body_and_bad_values_are_400(tiny_family):
    keys = [KeySpec(key="sk-batch-0123456789", name="batch", priority="sheddable"), KeySpec(key="sk-ops-0123456789", name="ops", admin=True)]
    ops = {"authorization": "Bearer sk-ops-0123456789"}
    batch = {"authorization": "Bearer sk-batch-0123456789"}
    with policy_fleet(tiny_family, [W("tiny-p60")], auth=Auth(keys)) as (url, _, _):
        assert request(url, SHORT, headers=batch).status == 200  # the key's default: sheddable
        assert request(url, SHORT, headers={**batch, "x-priority": "critical"}).status == 200  # the header overrides the key
        assert request(url, {**SHORT, "priority": "standard"}, headers={**batch, "x-priority": "critical"}).status == 200  # the body wins
        assert request(url, SHORT, headers=ops).status == 200  # no default: standard
        for p, n in (("sheddable", 1), ("critical", 1), ("standard", 2)):
            assert metric(url, f'family_admitted_total{{how="free",priority="{p}"}}', ops) == n, p

        r = request(url, SHORT, headers={**batch, "x-priority": "urgent"})
        err = httpx.Response(400, content=r.body).json()["error"]
        assert r.status == 400 and err["param"] == "x-priority" and err["code"] == "invalid_priority"
        r = request(url, {**SHORT, "priority": "urgent"}, headers=batch)
        assert r.status == 400 and httpx.Response(400, content=r.body).json()["error"]["param"] == "priority"
        assert all(w["healthy"] and w["cooldowns"] == 0 for w in workers_state(url, ops).values())


def test_priority_and_budget_are_never_forwarded_to_workers():
    # vLLM has its own `priority` (an int): our string must not reach it.
    body = CompletionRequest.model_validate({**SHORT, "priority": "critical", "budget": {"max_tpot_ms": 5}})
    payload = body.upstream_payload()
    assert body.priority == "critical" and "priority" not in payload and "budget" not in payload
