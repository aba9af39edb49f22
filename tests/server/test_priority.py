"""Priority classes and admission control through real HTTP (issue 12, item 1): real torch workers on
the tiny family behind real slow proxies (a held stream keeps its worker slot until the test lets it
go), the gateway with one slot per worker, static routing (the budget table's member order, no live load)."""

from __future__ import annotations

import httpx

from server.auth import Auth
from server.keys import KeySpec
from server.priority import RoutingPolicy
from server.protocol import CompletionRequest
from tests.server.gateway_fixtures import tiny_family  # noqa: F401  (fixture)
from tests.server.policy_fixtures import Hold, W, in_background, metric, policy_fleet, request, wait_until, workers_state

SLOW = {"per_chunk_s": 0.5}  # every streamed line 0.5 s: a 60-token stream would hold its slot 30 s; tests release it sooner
HOLD = {"prompt": "hold", "max_tokens": 60, "ignore_eos": True, "stream": True}
SHORT = {"model": "tiny", "prompt": "a", "max_tokens": 2}
ALL = [W("tiny-p100", SLOW), W("tiny-p80", SLOW), W("tiny-p60", SLOW)]


def _hold(url: str, model: str, worker: str) -> Hold:
    """A stream holding `worker`'s only slot until released; returns once the gateway counts it."""
    h = Hold(url, {"model": model, **HOLD})
    wait_until(lambda: workers_state(url)[worker]["in_flight"] >= 1, 30, f"a request in flight on {worker}")
    return h


def test_sheddable_downshifts_then_is_shed_with_retry_after_and_critical_keeps_its_member(tiny_family):
    policy = RoutingPolicy(worker_slots=1, sheddable_wait_s=0.3, max_wait_s=60)
    with policy_fleet(tiny_family, ALL, live=False, policy=policy) as (url, _, (p100, p80, p60)):
        h100 = _hold(url, "tiny", p100)  # routed, no budget: the parent

        # The parent is saturated: sheddable goes to the smallest member that fits, standard to the next best.
        r = request(url, {**SHORT, "priority": "sheddable"})
        assert r.status == 200 and r.member == "tiny-p60" and r.headers["x-family-route"] == "downshift", (r.status, r.headers)
        r = request(url, SHORT, headers={"x-priority": "sheddable"})
        assert r.status == 200 and r.member == "tiny-p60"
        r = request(url, SHORT)
        assert r.status == 200 and r.member == "tiny-p80" and r.headers["x-family-route"] == "best"

        # Every fitting worker saturated: sheddable waits briefly, then a 429 with Retry-After (not a timeout).
        h80, h60 = _hold(url, "tiny-p80", p80), _hold(url, "tiny-p60", p60)
        r = request(url, {**SHORT, "priority": "sheddable"})
        assert r.status == 429 and r.headers.get("retry-after"), (r.status, r.body)
        assert httpx.Response(429, content=r.body).json()["error"]["code"] == "shed"

        # Critical keeps its member: it waits for the parent's slot (while p80 and p60 are just as busy) and gets it.
        t, crit = in_background(url, {**SHORT, "priority": "critical"})
        wait_until(lambda: metric(url, "family_queue_waiting") == 1, 30, "the critical request queued")
        h80.release(), h60.release()  # a smaller member frees up first: critical does not take it
        wait_until(lambda: workers_state(url)[p60]["in_flight"] == 0, 30, "p60 free")
        assert metric(url, "family_queue_waiting") == 1
        assert h100.release().status == 200
        t.join(60)
        assert crit.status == 200 and crit.member == "tiny-p100", (crit.status, crit.body)
        assert metric(url, "family_downshifts_total") == 2
        assert metric(url, 'family_sheds_total{reason="wait_expired"}') == 1
        assert metric(url, 'family_admitted_total{how="queued",priority="critical"}') == 1


def test_critical_takes_the_place_of_a_sheddable_request_waiting_in_the_queue(tiny_family):
    policy = RoutingPolicy(worker_slots=1, sheddable_wait_s=60, max_wait_s=60, max_queue=1)
    with policy_fleet(tiny_family, ALL, live=False, policy=policy) as (url, _, workers):
        holds = [_hold(url, m, w) for m, w in zip(("tiny-p100", "tiny-p80", "tiny-p60"), workers)]
        t_shed, shed = in_background(url, {**SHORT, "priority": "sheddable"})
        wait_until(lambda: metric(url, "family_queue_waiting") == 1, 30, "the sheddable request queued")
        t_crit, crit = in_background(url, {**SHORT, "priority": "critical"})
        t_shed.join(30)  # evicted: answered at once, not after its 60 s wait
        assert shed.status == 429 and shed.headers.get("retry-after"), (shed.status, shed.body)
        assert metric(url, 'family_sheds_total{reason="evicted"}') == 1
        holds[0].release()
        t_crit.join(60)
        assert crit.status == 200 and crit.member == "tiny-p100"
        for h in holds[1:]:
            h.release()


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
