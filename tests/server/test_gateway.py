"""The gateway, through real HTTP: real torch workers on a tiny family, the official openai client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from family.registry import load_family
from tests.server.gateway_fixtures import fleet, tiny_family  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def static_gateway(tiny_family):
    with fleet(tiny_family, {"tiny-p100": 1, "tiny-p80": 1, "tiny-p60": 1}, live=False) as g:
        yield g


def _quality(family_root, name):
    return load_family(family_root).registry.member(name).quality


@pytest.mark.parametrize(
    "budget, expect",
    [
        ({}, "tiny-p100"),
        ({"max_ttft_ms": 500}, "tiny-p100"),
        ({"max_ttft_ms": 300}, "tiny-p80"),
        ({"max_ttft_ms": 100}, "tiny-p60"),
        ({"max_latency_ms": 700}, "tiny-p100"),
        ({"max_latency_ms": 400}, "tiny-p80"),
        ({"max_latency_ms": 100}, "tiny-p60"),
        ({"min_accuracy": 0.8, "max_latency_ms": 400}, "tiny-p80"),
        ({"min_accuracy": 0.95}, "tiny-p100"),
    ],
)
def test_routing_picks_the_most_accurate_member_that_fits(static_gateway, budget, expect):
    url, client, _ = static_gateway
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, extra_body={"budget": budget}
    )
    # p100: 400 + 7·40 = 680 ms; p80: 150 + 7·20 = 290 ms; p60: 30 + 7·5 = 65 ms (max_tokens 8).
    assert raw.headers["x-family-member"] == expect
    assert float(raw.headers["x-family-predicted-ttft-ms"]) > 0
    assert raw.parse().choices[0].message.content is not None


def test_memory_and_accuracy_limits_exclude_members(static_gateway, tiny_family):
    url, client, _ = static_gateway
    fam = load_family(tiny_family)
    p100, p80 = fam.registry.member("tiny-p100"), fam.registry.member("tiny-p80")
    between = (p100.bytes["float32"] + p80.bytes["float32"]) / 2 / 1e9
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2, "budget": {"max_memory_gb": between}})
    assert r.headers["x-family-member"] == "tiny-p80"
    floor = (p80.quality + fam.registry.member("tiny-p60").quality) / 2
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2, "budget": {"min_accuracy": floor, "max_ttft_ms": 300}})
    assert r.headers["x-family-member"] == "tiny-p80"


def test_budget_headers_work_like_the_body(static_gateway):
    url, _, _ = static_gateway
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}, headers={"x-slo-ttft-ms": "100"})
    assert r.status_code == 200 and r.headers["x-family-member"] == "tiny-p60"
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2, "budget": {"max_ttft_ms": 300}},
                   headers={"x-slo-ttft-ms": "100"})
    assert r.headers["x-family-member"] == "tiny-p80"  # the body wins


def test_an_impossible_budget_is_a_422_naming_the_constraint_and_the_closest_member(static_gateway):
    url, client, _ = static_gateway
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(model="tiny", prompt="a", max_tokens=4, extra_body={"budget": {"max_ttft_ms": 1}})
    err = info.value.body
    assert info.value.status_code == 422
    assert err["type"] == "budget_error" and err["param"] == "budget.max_ttft_ms" and "tiny-p60" in err["message"]


def test_best_effort_serves_the_closest_member_instead(static_gateway):
    url, client, _ = static_gateway
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt="a", max_tokens=4, extra_body={"budget": {"max_ttft_ms": 1, "allow_best_effort": True}}
    )
    assert raw.headers["x-family-member"] == "tiny-p60" and raw.headers["x-family-route"] == "best_effort"


def test_a_pinned_member_is_served_as_asked(static_gateway):
    _, client, _ = static_gateway
    out = client.chat.completions.create(model="tiny-p80", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    assert out.model == "tiny-p80" and out.usage.completion_tokens <= 3


def test_streaming_through_the_gateway_with_usage(static_gateway):
    _, client, _ = static_gateway
    chunks = list(client.chat.completions.create(
        model="tiny-p60", messages=[{"role": "user", "content": "x"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    whole = client.chat.completions.create(model="tiny-p60", messages=[{"role": "user", "content": "x"}], max_tokens=6, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_routed_text_streaming_and_a_caller_leaving_mid_stream(static_gateway):
    url, client, _ = static_gateway
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt="The", max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"budget": {"max_ttft_ms": 100}},
    )
    assert raw.headers["x-family-member"] == "tiny-p60" and float(raw.headers["x-family-predicted-latency-ms"]) > 0
    chunks = list(raw.parse())
    whole = client.completions.create(model="tiny-p60", prompt="The", max_tokens=5, temperature=0)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    body = {"model": "tiny-p60", "prompt": "a", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break  # the caller goes away
    deadline = time.monotonic() + 10
    while any(w["in_flight"] for w in httpx.get(f"{url}/v1/family").json()["workers"]):
        assert time.monotonic() < deadline, "the gateway kept the request in flight"
        time.sleep(0.05)
    assert 'outcome="cancelled"' in httpx.get(f"{url}/metrics").text


def test_models_family_health_and_metrics_endpoints(static_gateway):
    url, client, _ = static_gateway
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "tiny-p100", "tiny-p80", "tiny-p60"]
    assert all(m.max_model_len for m in client.models.list().data)
    fam = httpx.get(f"{url}/v1/family").json()
    assert {w["member"] for w in fam["workers"]} == {"tiny-p100", "tiny-p80", "tiny-p60"}
    assert httpx.get(f"{url}/health").json()["healthy_workers"] == 3
    client.completions.create(model="tiny-p60", prompt="a", max_tokens=2)
    text = httpx.get(f"{url}/metrics").text
    for name in ("family_requests_total", "family_e2e_request_latency_seconds", "family_routing_decisions_total", "family_worker_healthy"):
        assert name in text


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "nope", "prompt": "a"}, 404, "model"),
        ({"model": "tiny", "prompt": "a", "budget": {"max_ttft_ms": -5}}, 400, "budget.max_ttft_ms"),
        ({"model": "tiny", "prompt": "a", "budget": {"surprise": 1}}, 400, "budget.surprise"),
        ({"model": "tiny", "prompt": "word " * 400}, 400, "prompt"),  # over the worker's 256: its 400 passes through
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 2100}]}, 400, "messages"),  # over 2048: the router's
        ({"model": "tiny", "messages": []}, 400, None),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(static_gateway, body, status, param):
    url, _, _ = static_gateway
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(f"{url}{path}", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param:
        assert err["param"] == param


def test_malformed_json_and_bad_budget_header(static_gateway):
    url, _, _ = static_gateway
    r = httpx.post(f"{url}/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a"}, headers={"x-slo-ttft-ms": "fast"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-slo-ttft-ms"


@pytest.mark.parametrize("content", [b"", b"[1]", b"null", b'"prompt"'])
def test_a_body_that_is_not_a_json_object_is_a_400_invalid_json(static_gateway, content):
    url, _, _ = static_gateway
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


def test_a_killed_worker_is_routed_around(tiny_family):
    with fleet(tiny_family, {"tiny-p100": 2}) as (url, client, specs):
        fam_workers = httpx.get(f"{url}/v1/family").json()["workers"]
        assert all(w["healthy"] for w in fam_workers)
        # Kill one of the two parent workers: stop its server (connections refused from now on).
        victim = specs[0].base
        _stop_server(victim)
        served_by = set()
        for _ in range(6):
            raw = client.completions.with_raw_response.create(model="tiny-p100", prompt="a", max_tokens=2)
            assert raw.http_response.status_code == 200
            served_by.add(raw.headers["x-family-worker"])
        assert served_by == {specs[1].base}
        state = {w["url"]: w for w in httpx.get(f"{url}/v1/family").json()["workers"]}
        assert state[victim]["healthy"] is False or state[victim]["in_cooldown"]


def _stop_server(base_url: str) -> None:
    """Stop the uvicorn server listening at base_url (started by tests.server.conftest.serve)."""
    from tests.server.conftest import RUNNING

    RUNNING[base_url].should_exit = True
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base_url}/health", timeout=0.5)
        except httpx.HTTPError:
            return
        time.sleep(0.1)
    raise RuntimeError("worker did not stop")
