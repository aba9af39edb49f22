"""Session and prefix affinity through real HTTP (issue 12, item 2): the parent on two real torch
workers; under load a session stays on its worker while the load guard allows and moves past it; an
affinity hit on a prefix-caching worker is predicted with the cached prefix left out of the prefill."""

from __future__ import annotations

import pytest

from loadtests.tinyfamily import build_tiny_family
from server.priority import RoutingPolicy
from tests.server.gateway_fixtures import DEVICE
from tests.server.policy_fixtures import Hold, W, metric, policy_fleet, request, wait_until, workers_state

# The parent's TTFT grows with the prompt (2 ms a token) and with load (50 ms per request in flight),
# so the router prefers the idle worker and a cached prefix shows in the prediction.
A1 = 0.002
LATENCY = {
    "tiny-p100": {"a0": 0.100, "a1": A1, "a2": 0.0, "a3": 0.050, "b0": 0.020, "b1": 0.0, "b2": 0.0},
    "tiny-p80": {"a0": 0.080, "a1": A1, "a2": 0.0, "a3": 0.050, "b0": 0.015, "b1": 0.0, "b2": 0.0},
    "tiny-p60": {"a0": 0.060, "a1": A1, "a2": 0.0, "a3": 0.050, "b0": 0.010, "b1": 0.0, "b2": 0.0},
}
HOLD = {"model": "tiny", "prompt": "hold", "max_tokens": 60, "ignore_eos": True, "stream": True}  # held until released
SHORT = {"model": "tiny", "prompt": "a", "max_tokens": 2}
PROMPT = "The history of the river begins in the mountains, where snow melts every spring. " * 4  # ~ 70 tokens


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_tiny_family(tmp_path_factory.mktemp("affinity-family"), DEVICE, latency=LATENCY)


def _affinity(url: str, result: str) -> float:
    return metric(url, f'family_affinity_total{{result="{result}"}}')


def test_a_session_stays_on_its_worker_under_load_and_moves_past_the_load_guard(family):
    policy = RoutingPolicy(affinity_max_extra_load=2)
    # x: behind a slow proxy (its streams last until released: the load); y: direct. Both idle, x is listed first.
    with policy_fleet(family, [W("tiny-p100", {"per_chunk_s": 0.5}), W("tiny-p100")], live=True, policy=policy) as (url, _, (x, y)):
        session = {"x-session-id": "conversation-1"}
        first = request(url, SHORT, headers=session)
        assert first.status == 200 and first.worker == x
        held = [Hold(url, HOLD, headers=session)]  # the session's own streams: on x
        wait_until(lambda: workers_state(url)[x]["in_flight"] == 1, 30, "a stream on x")
        held.append(Hold(url, HOLD, headers=session))
        wait_until(lambda: workers_state(url)[x]["in_flight"] == 2, 30, "two streams on x")
        assert workers_state(url)[y]["in_flight"] == 0

        # x carries 2 more requests than y: within the guard, the session stays on x ...
        r = request(url, SHORT, headers=session)
        assert r.status == 200 and r.worker == x
        # ... where a request without a session goes to the idle worker.
        assert request(url, SHORT).worker == y
        hits = _affinity(url, "hit")

        held.append(Hold(url, HOLD, headers=session))  # a third stream: x at 3, y at 0
        wait_until(lambda: workers_state(url)[x]["in_flight"] == 3, 30, "three streams on x")
        r = request(url, SHORT, headers=session)
        assert r.status == 200 and r.worker == y  # past the guard: normal routing
        assert _affinity(url, "load_guard") == 1 and _affinity(url, "hit") == hits + 1
        # The session now lives on y.
        assert request(url, SHORT, headers=session).worker == y
        for h in held:
            out = h.release()
            assert out.status == 200 and out.worker == x


def _predicted_ttft(r) -> float:
    assert r.status == 200, r.body
    return float(r.headers["x-family-predicted-ttft-ms"])


@pytest.mark.parametrize("caching", [True, False])
def test_an_affinity_hit_is_predicted_without_the_cached_prefix_on_a_prefix_caching_worker(family, caching):
    spec = {"prefix_caching": caching}
    with policy_fleet(family, [W("tiny-p100", spec=spec), W("tiny-p100", spec=spec)], live=False) as (url, _, _):
        turn1 = {"model": "tiny-p100", "prompt": PROMPT, "max_tokens": 2}
        turn2 = {**turn1, "prompt": PROMPT + "Then it reaches the sea."}
        cold = _predicted_ttft(request(url, turn2))  # a first turn: nothing cached
        request(url, turn1, headers={"x-session-id": "s"})
        warm = _predicted_ttft(request(url, turn2, headers={"x-session-id": "s"}))
        # user field as the key
        request(url, {**turn1, "user": "alice"})
        by_user = _predicted_ttft(request(url, {**turn2, "user": "alice"}))
        # a long shared prefix as the key (different endings, no session, no user)
        shared = "You are a careful assistant. " * 30  # 870 characters
        prefix_cold = _predicted_ttft(request(url, {**turn1, "prompt": shared + "Question one?"}))
        prefix_warm = _predicted_ttft(request(url, {**turn1, "prompt": shared + "Question two, a little longer?"}))
        if caching:
            # TTFT = 100 ms + 2 ms per prefilled token: turn 1 is most of turn 2, the 512 keyed characters most of the prefix prompt
            assert warm < 100 + 0.3 * (cold - 100), (warm, cold)
            assert by_user == pytest.approx(warm, abs=1)
            assert prefix_warm < 100 + 0.7 * (prefix_cold - 100), (prefix_warm, prefix_cold)
        else:  # the torch engine caches nothing: affinity keeps the worker, the prediction does not change
            assert warm == pytest.approx(cold, abs=0.5) and by_user == pytest.approx(cold, abs=0.5)
        assert _affinity(url, "hit") == 3


def test_affinity_off_routes_every_request_afresh(family):
    with policy_fleet(family, [W("tiny-p100"), W("tiny-p100")], live=False, policy=RoutingPolicy(affinity=False)) as (url, _, _):
        request(url, SHORT, headers={"x-session-id": "s"})
        assert request(url, SHORT, headers={"x-session-id": "s"}).status == 200
        assert _affinity(url, "hit") == 0 and _affinity(url, "new") == 0
