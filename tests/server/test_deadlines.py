"""Streaming resilience and the TPOT budget through real HTTP (issue 12, item 3).

A stalling worker is a real torch worker behind loadtests.slowproxy with a start delay: its /health
answers at once, its completions start only after `delay_s`, so a stream shows no first token for
that long. Static routing puts it first among the parent's two workers, so every request meets it.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from loadtests.budgets import Figures, Outcome, judge
from server.priority import RoutingPolicy
from tests.server.gateway_fixtures import DEVICE, fleet, tiny_family  # noqa: F401  (fixture)
from tests.server.policy_fixtures import W, metric, policy_fleet, request, workers_state

STALL = {"delay_s": 6.0}  # no first token for 6 s (its /health stays fast)
DEFAULT_S = 1.0  # the gateway's default first-token deadline in these tests


@pytest.fixture(scope="module")
def stalling(tiny_family):
    """The parent on a stalling worker (first choice) and a healthy one; p60 only on a stalling one."""
    policy = RoutingPolicy(first_token_s=DEFAULT_S)
    with policy_fleet(tiny_family, [W("tiny-p100", STALL), W("tiny-p100"), W("tiny-p60", STALL)], live=False, policy=policy) as g:
        yield g


def _stream(client: openai.OpenAI, **kw) -> tuple[dict, str, float]:
    start = time.monotonic()
    with client.completions.with_streaming_response.create(model="tiny", prompt="The river", max_tokens=8, stream=True, **kw) as resp:
        headers = dict(resp.headers)
        text = "".join(line for line in resp.iter_lines())
    return headers, text, time.monotonic() - start


def test_no_first_token_by_the_ttft_budget_moves_the_stream_to_the_next_worker(stalling):
    url, client, (stalled, healthy, _) = stalling
    before = metric(url, f'family_first_token_deadline_cancels_total{{worker="{stalled}"}}')
    headers, text, elapsed = _stream(client, extra_body={"budget": {"max_ttft_ms": 700}})  # the parent is predicted at 400 ms
    assert headers["x-family-worker"] == healthy and headers["x-family-member"] == "tiny-p100"
    assert "data: [DONE]" in text and '"error"' not in text  # a clean stream: nothing of the stalled attempt reached us
    assert 0.7 <= elapsed < STALL["delay_s"]  # cancelled at its deadline, not after the stall
    assert metric(url, f'family_first_token_deadline_cancels_total{{worker="{stalled}"}}') == before + 1
    w = workers_state(url)[stalled]
    assert w["healthy"] and not w["in_cooldown"] and w["cooldowns"] == 0  # a deadline never takes a worker out


def test_without_a_budget_the_default_deadline_applies(stalling):
    url, client, (stalled, healthy, _) = stalling
    headers, text, elapsed = _stream(client)
    assert headers["x-family-worker"] == healthy and "data: [DONE]" in text
    assert DEFAULT_S <= elapsed < STALL["delay_s"]


def test_a_stall_on_the_last_choice_is_a_504_with_retry_after_not_a_hang(stalling):
    url, _, _ = stalling
    r = request(url, {"model": "tiny-p60", "prompt": "a", "max_tokens": 4, "stream": True, "budget": {"max_ttft_ms": 300}})
    err = httpx.Response(r.status, content=r.body).json()["error"]
    assert r.status == 504 and r.headers.get("retry-after") and err["code"] == "first_token_timeout", r.body
    assert DEFAULT_S <= r.elapsed < STALL["delay_s"]  # the last choice gets the default deadline, not the 300 ms budget


@pytest.fixture(scope="module")
def static_gateway(tiny_family):
    with fleet(tiny_family, {"tiny-p100": 1, "tiny-p80": 1, "tiny-p60": 1}, live=False) as g:
        yield g


def test_tpot_budget_routes_to_a_member_predicted_within_it(static_gateway):
    url, client, _ = static_gateway
    # Predicted time per output token (test figures): p100 40 ms, p80 20 ms, p60 5 ms.
    for tpot, expect in ((50, "tiny-p100"), (30, "tiny-p80"), (10, "tiny-p60")):
        raw = client.completions.with_raw_response.create(model="tiny", prompt="a", max_tokens=4, extra_body={"budget": {"max_tpot_ms": tpot}})
        assert raw.headers["x-family-member"] == expect, tpot
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4}, headers={"x-slo-tpot-ms": "10"})
    assert r.status_code == 200 and r.headers["x-family-member"] == "tiny-p60"
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4, "budget": {"max_tpot_ms": 30}},
                   headers={"x-slo-tpot-ms": "10"})
    assert r.headers["x-family-member"] == "tiny-p80"  # the body wins
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(model="tiny", prompt="a", max_tokens=4, extra_body={"budget": {"max_tpot_ms": 1}})
    assert info.value.body["param"] == "budget.max_tpot_ms" and "tiny-p60" in info.value.body["message"]
    for bad in ("fast", "-5"):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a"}, headers={"x-slo-tpot-ms": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-slo-tpot-ms"


def test_goodput_counts_a_tpot_budget(tiny_family):
    fig = Figures.from_dir(tiny_family, DEVICE)

    def outcome(stream: bool, tpot_ms: float | None, e2e_ms: float, tokens: int) -> Outcome:
        return judge(Outcome(policy="gateway", cls="c", budget={"max_tpot_ms": 20}, model="tiny", chat=False, stream=stream, max_tokens=tokens,
                             start=0, status=200, e2e_ms=e2e_ms, ttft_ms=5, tpot_ms=tpot_ms, tokens=tokens, member="tiny-p60", done=True), fig)

    assert outcome(True, 15, 300, 16).met
    assert outcome(True, 25, 300, 16).missed == ["max_tpot_ms"]
    assert outcome(False, None, 160, 16).met  # 10 ms per token, counting the whole time
    assert outcome(False, None, 480, 16).missed == ["max_tpot_ms"]
