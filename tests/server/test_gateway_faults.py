"""The gateway when things go wrong or are restricted, through real HTTP: a worker killed mid-stream,
a worker at capacity (429), API keys with budgets and rate limits; and `family serve` as one command."""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from family.profile import WorkerProcess
from family.registry import load_family
from server.auth import Auth, KeySpec
from server.fleet import WorkerSpec
from server.gateway import create_app
from server.protocol import Budget
from tests.server.conftest import free_port, serve
from tests.server.gateway_fixtures import DEVICE, fleet, tiny_family  # noqa: F401  (fixture)


def test_a_worker_dying_mid_stream_ends_the_stream_with_an_error_event(tiny_family, tmp_path):
    fam = load_family(tiny_family)
    with WorkerProcess(fam.member_dir("tiny-p60"), "tiny-p60", "torch", log=tmp_path / "worker.log") as worker:
        spec = WorkerSpec(url=worker.url, member="tiny-p60", device_class=DEVICE)
        with serve(create_app(fam, [spec], health_interval=0.3)) as url:
            body = {"model": "tiny", "prompt": "a", "max_tokens": 1800, "ignore_eos": True, "stream": True}
            lines = []
            start = time.monotonic()
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
                assert r.status_code == 200 and r.headers["x-family-member"] == "tiny-p60"
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                    if len(lines) == 5:
                        worker.proc.kill()  # SIGKILL: no goodbye
            assert time.monotonic() - start < 20  # ended, never hung
            assert lines[-1] == "data: [DONE]"
            error = json.loads(lines[-2].removeprefix("data: "))["error"]
            assert error["type"] == "server_error" and error["code"] == "upstream_failed"
            assert not any('"finish_reason":"length"' in line for line in lines)
            metrics = httpx.get(f"{url}/metrics").text
            assert 'family_requests_total{member="tiny-p60",outcome="stream_error"' in metrics
            state = httpx.get(f"{url}/v1/family").json()["workers"][0]
            assert state["in_cooldown"] or not state["healthy"]


def test_a_workers_429_is_passed_on_with_retry_after_when_no_other_worker_can_take_it(tiny_family):
    with fleet(tiny_family, {"tiny-p60": 1}, worker_kwargs={"max_batch": 1, "max_waiting": 1}) as (url, _, _):
        body = {"model": "tiny-p60", "prompt": "a", "max_tokens": 150, "ignore_eos": True}
        with cf.ThreadPoolExecutor(6) as ex:
            responses = list(ex.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=60), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes
        r429 = next(r for r in responses if r.status_code == 429)
        assert int(r429.headers["retry-after"]) >= 1
        assert r429.json()["error"]["type"] == "rate_limit_error"
        assert 'family_retries_total{reason="429"' in httpx.get(f"{url}/metrics").text


KEYS = [
    KeySpec(key="sk-team-a-123", name="team-a", budget=Budget(max_ttft_ms=100)),
    KeySpec(key="sk-slow-12345", name="slow", requests_per_minute=60),
    KeySpec(key="sk-ops-12345", name="ops", admin=True),
]


def test_api_keys_budgets_rate_limits_and_admin_endpoints(tiny_family):
    with fleet(tiny_family, {"tiny-p100": 1, "tiny-p80": 1, "tiny-p60": 1}, auth=Auth(KEYS), live=False) as (url, _, _):
        team = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-team-a-123", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong-key", max_retries=0).models.list()
        # The key's default budget (ttft ≤ 100 ms) routes to p60; a header overrides it; the body overrides both.
        raw = team.completions.with_raw_response.create(model="tiny", prompt="a", max_tokens=2)
        assert raw.headers["x-family-member"] == "tiny-p60"
        raw = team.completions.with_raw_response.create(model="tiny", prompt="a", max_tokens=2, extra_headers={"x-slo-ttft-ms": "300"})
        assert raw.headers["x-family-member"] == "tiny-p80"
        raw = team.completions.with_raw_response.create(model="tiny", prompt="a", max_tokens=2, extra_headers={"x-slo-ttft-ms": "300"},
                                                        extra_body={"budget": {"max_ttft_ms": 1000}})
        assert raw.headers["x-family-member"] == "tiny-p100"
        # 60 requests/minute: one now, the next is refused with Retry-After.
        slow = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-slow-12345", max_retries=0)
        slow.completions.create(model="tiny-p60", prompt="a", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as info:
            slow.completions.create(model="tiny-p60", prompt="a", max_tokens=1)
        assert int(info.value.response.headers["retry-after"]) >= 1
        # Worker details and metrics are for admins.
        for path in ("/v1/family", "/metrics"):
            assert httpx.get(f"{url}{path}", headers={"authorization": "Bearer sk-team-a-123"}).status_code == 403
            assert httpx.get(f"{url}{path}", headers={"authorization": "Bearer sk-ops-12345"}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # health stays open for load balancers


@pytest.mark.slow  # three worker processes start (torch imports): 20 s on a quiet machine, minutes on a busy one
def test_family_serve_starts_local_workers_routes_and_stops_them(tiny_family, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "family.cli", "serve", "--family", str(tiny_family), "--port", str(port),
                             "--device-class", DEVICE, "--health-interval", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=1).json().get("healthy_workers") == 3:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, "gateway not ready"
            time.sleep(0.3)
        workers = [w["url"] for w in httpx.get(f"{url}/v1/family").json()["workers"]]
        assert len(workers) == 3
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={"budget": {"max_latency_ms": 400}})
        assert raw.headers["x-family-member"] == "tiny-p80"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    for w in workers:  # the local workers stopped with the gateway
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{w}/health", timeout=1)
