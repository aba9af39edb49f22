"""OpenTelemetry spans through real HTTP (issue 12, item 5): one span per request in the SDK's in-memory
exporter, with the member, worker, attempts and predicted against observed latency, the caller's
traceparent continued, and refusals recorded. Real torch workers on the tiny family, the official openai
client; a stub worker only where one has to fail on cue."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from family.registry import load_family
from server.auth import Auth
from server.keys import KeySpec
from server.worker_torch import create_app as create_worker
from tests.server.gateway_fixtures import fleet, tiny_family  # noqa: F401  (fixture)
from tests.server.test_hostile import gateway, stub_worker

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture()
def exporter():
    return InMemorySpanExporter()


@pytest.fixture()
def provider(exporter):
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    return p


def spans(exporter: InMemorySpanExporter, n: int, timeout_s: float = 5.0):
    """The first `n` finished spans (a span ends just after its response is sent)."""
    deadline = time.monotonic() + timeout_s
    while len(exporter.get_finished_spans()) < n:
        assert time.monotonic() < deadline, f"{len(exporter.get_finished_spans())} spans, expected {n}"
        time.sleep(0.02)
    return list(exporter.get_finished_spans())


def test_a_span_per_request_with_member_worker_attempts_and_latencies(tiny_family, provider, exporter):
    with fleet(tiny_family, {"tiny-p100": 1, "tiny-p80": 1, "tiny-p60": 1}, live=False, tracer_provider=provider) as (url, client, _):
        raw = client.completions.with_raw_response.create(model="tiny", prompt="The city", max_tokens=4,
                                                           extra_body={"budget": {"max_ttft_ms": 200}})
        (span,) = spans(exporter, 1)
        a = span.attributes
        assert span.name == "POST /v1/completions" and span.kind == SpanKind.SERVER
        assert a["family.member"] == raw.headers["x-family-member"] == "tiny-p80"
        assert a["family.worker"] == raw.headers["x-family-worker"] and a["family.route"] == "best"
        assert a["family.attempts"] == 1 and len([e for e in span.events if e.name == "attempt"]) == 1
        assert a["family.predicted_ttft_ms"] == pytest.approx(float(raw.headers["x-family-predicted-ttft-ms"]), abs=0.1)
        assert a["family.predicted_latency_ms"] == pytest.approx(float(raw.headers["x-family-predicted-latency-ms"]), abs=0.1)
        assert 0 < a["family.observed_latency_ms"] < (span.end_time - span.start_time) / 1e6 + 1
        assert a["http.response.status_code"] == 200 and a["family.max_tokens"] == 4 and a["family.prompt_tokens"] > 0
        assert span.status.status_code != StatusCode.ERROR

        # Streamed, with the caller's traceparent: the span joins the caller's trace and sees the first token.
        exporter.clear()
        stream = client.chat.completions.create(model="tiny-p60", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                                stream=True, extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        assert [c for c in stream]
        (span,) = spans(exporter, 1)
        assert f"{span.context.trace_id:032x}" == TRACE_ID and f"{span.parent.span_id:016x}" == PARENT_ID
        a = span.attributes
        assert a["family.member"] == "tiny-p60" and a["family.route"] == "pinned" and a["family.stream"] is True
        assert 0 < a["family.observed_ttft_ms"] <= a["family.observed_latency_ms"] and a["family.outcome"] == "ok"


def test_retries_show_as_attempts_and_the_worker_gets_the_traceparent(tiny_family, provider, exporter):
    fam = load_family(tiny_family)
    flaky = stub_worker("tiny-p60", fail=lambda body: True)
    real = create_worker(fam.member_dir("tiny-p60"), "tiny-p60", max_model_len=256)
    with gateway(tiny_family, [("tiny-p60", flaky), ("tiny-p60", real)], tracer_provider=provider) as (url, client, specs):
        raw = client.completions.with_raw_response.create(model="tiny-p60", prompt="a", max_tokens=2,
                                                          extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        (span,) = spans(exporter, 1)
        attempts = [e for e in span.events if e.name == "attempt"]
        assert span.attributes["family.attempts"] == 2 and len(attempts) == 2
        assert [e.attributes["family.worker"] for e in attempts] == [specs[0].base, specs[1].base]
        assert span.attributes["family.worker"] == raw.headers["x-family-worker"] == specs[1].base
        # The worker was asked under this span: same trace, the gateway's span as its parent.
        (tp,) = flaky.state.traceparents
        assert tp.split("-")[1] == TRACE_ID and tp.split("-")[2] == f"{span.context.span_id:016x}"


def test_refusals_are_spans_too(tiny_family, provider, exporter):
    keys = [KeySpec(key="sk-trace-quota", name="quota", tokens_per_day=1)]
    with fleet(tiny_family, {"tiny-p60": 1}, auth=Auth(keys), tracer_provider=provider) as (url, _, _):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-trace-quota", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="tiny", prompt="a", max_tokens=2)
        assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a"}).status_code == 401
        by_status = {s.attributes["http.response.status_code"]: s for s in spans(exporter, 2)}
        assert by_status[429].attributes["error.type"] == "daily_tokens_exceeded" and by_status[429].attributes["family.key"] == "quota"
        assert by_status[401].attributes["error.type"] == "invalid_api_key"
        assert all("family.worker" not in s.attributes for s in by_status.values())  # refused before any worker


def test_tracing_is_off_by_default(tiny_family, exporter):
    from opentelemetry import trace

    from server.tracing import tracer_provider

    assert tracer_provider("none") is None
    global_provider = TracerProvider()  # even with a global provider set, the gateway makes no span unless given one
    global_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(global_provider)
    with fleet(tiny_family, {"tiny-p60": 1}) as (url, client, _):
        assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices
        time.sleep(0.2)
        assert exporter.get_finished_spans() == ()
