"""Hostile input against the gateway, through real HTTP (issue 13): out-of-range fields, poison requests,
oversized bodies, key caps and per-key concurrency. Real torch workers on the tiny family, the official
openai client; a small stub worker only where a worker has to misbehave on cue (answer 500, be slow)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from family.registry import load_family
from server.auth import Auth
from server.fleet import WorkerSpec
from server.gateway import create_app
from server.keys import KeyCap, KeySpec, hash_key
from server.protocol import Budget
from server.worker_torch import create_app as create_worker
from tests.server.conftest import serve
from tests.server.gateway_fixtures import DEVICE, fleet, tiny_family  # noqa: F401  (fixture)

HUGE_SEED = 1180591620717411303424  # 2**70: the seed from the issue


def _workers(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/family").json()["workers"]


def _metric(url: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(prefix))


def stub_worker(member: str, *, fail=lambda body: False, stream_s: float = 0.0) -> FastAPI:
    """A worker that answers /v1/completions with 500 when `fail(body)`, else a one-token completion; a
    streamed request gets one token every 0.1 s for `stream_s` seconds. `app.state.calls` counts requests;
    `app.state.traceparents` keeps each request's W3C traceparent header."""
    app = FastAPI()
    app.state.calls = []
    app.state.traceparents = []

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse("")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.calls.append(body["prompt"])
        app.state.traceparents.append(request.headers.get("traceparent"))
        if fail(body):
            return JSONResponse({"error": {"message": "engine exploded on this request", "type": "server_error", "param": None,
                                           "code": None}}, status_code=500)
        if body.get("stream"):
            async def tokens():
                for _ in range(max(1, int(stream_s / 0.1))):
                    chunk = {"id": "c", "object": "text_completion", "created": 0, "model": member,
                             "choices": [{"index": 0, "text": "x", "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
                    await asyncio.sleep(0.1)
                yield "data: [DONE]\n\n"
            return StreamingResponse(tokens(), media_type="text/event-stream")
        return {"id": "c", "object": "text_completion", "created": 0, "model": member,
                "choices": [{"index": 0, "text": "x", "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app


@contextlib.contextmanager
def gateway(family_root, workers: list[tuple[str, FastAPI]], **kwargs):
    """The gateway (static routing: the first listed worker of a member is its first choice) over `workers`."""
    fam = load_family(family_root)
    with contextlib.ExitStack() as stack:
        specs = [WorkerSpec(url=stack.enter_context(serve(app)), member=m, device_class=DEVICE) for m, app in workers]
        url = stack.enter_context(serve(create_app(fam, specs, health_interval=0.3, live=False, **kwargs)))
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), specs


# --- validation at the edge ----------------------------------------------------------------------


def test_a_huge_seed_is_a_400_and_every_worker_stays_in_rotation(tiny_family):
    with fleet(tiny_family, {"tiny-p100": 1, "tiny-p80": 1, "tiny-p60": 1}) as (url, client, specs):
        for model in ("tiny", "tiny-p100"):  # routed, and pinned to the parent (both took workers out before)
            for _ in range(3):
                with pytest.raises(openai.BadRequestError) as info:
                    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                                   seed=HUGE_SEED)
                assert info.value.body["param"] == "seed" and info.value.body["type"] == "invalid_request_error"
        # The worker refuses it the same way on its own (a 400, not a failed generation and a 500).
        r = httpx.post(f"{specs[0].base}/v1/completions", json={"model": "tiny-p100", "prompt": "a", "seed": HUGE_SEED})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
        for seed in (2**63 - 1, -(2**63)):  # the whole signed 64-bit range is served
            assert client.completions.create(model="tiny-p60", prompt="a", max_tokens=2, seed=seed).choices
        workers = _workers(url)
        assert len(workers) == 3
        assert all(w["healthy"] and not w["in_cooldown"] and w["cooldowns"] == 0 for w in workers), workers
        assert _metric(url, "family_retries_total") == 0


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 2**40}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"),
    ({"stop": ["x" * 600]}, "stop"),
    ({"user": "u" * 300}, "user"),
])
def test_out_of_range_fields_are_400_at_the_edge(tiny_family, extra, param):
    with fleet(tiny_family, {"tiny-p60": 1}) as (url, _, _):
        body = json.dumps({"model": "tiny", "prompt": "a", **extra}).encode()  # NaN goes out as a bare NaN token
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert _metric(url, "family_requests_total") == 0  # no worker saw it


# --- poison-request isolation --------------------------------------------------------------------


def test_a_request_that_fails_on_two_workers_is_the_callers_400_and_cools_nobody_down(tiny_family):
    poison = lambda body: body["prompt"].startswith("poison")  # noqa: E731
    stubs = [stub_worker("tiny-p60", fail=poison) for _ in range(3)]
    with gateway(tiny_family, [("tiny-p60", s) for s in stubs]) as (url, client, _):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny-p60", prompt="poison pill", max_tokens=2)
        err = info.value.body
        assert err["code"] == "request_failed_on_workers" and "likely cause" in err["message"]
        assert "engine exploded on this request" in err["message"]
        assert sum(len(s.state.calls) for s in stubs) == 2  # retried on exactly one other worker
        assert _metric(url, 'family_poison_requests_total{member="tiny-p60"}') == 1
        time.sleep(0.4)  # a health round: the suspects pass their checks
        assert all(w["healthy"] and not w["in_cooldown"] and w["cooldowns"] == 0 and w["strikes"] == 0 for w in _workers(url))
        assert client.completions.create(model="tiny", prompt="fine", max_tokens=2).choices[0].text == "x"


def test_a_worker_that_fails_one_request_stays_in_rotation_and_one_that_fails_many_is_cooled_down(tiny_family):
    fam = load_family(tiny_family)
    flaky = stub_worker("tiny-p60", fail=lambda body: True)  # health checks pass, every completion is a 500
    real = create_worker(fam.member_dir("tiny-p60"), "tiny-p60", max_model_len=256, max_batch=4)
    with gateway(tiny_family, [("tiny-p60", flaky), ("tiny-p60", real)]) as (url, client, specs):
        bad, good = specs[0].base, specs[1].base
        for n in (1, 2):  # different requests, each served by the real worker after the stub's 500
            raw = client.completions.with_raw_response.create(model="tiny-p60", prompt=f"request {n}", max_tokens=2)
            assert raw.headers["x-family-worker"] == good
            state = {w["url"]: w for w in _workers(url)}
            assert not state[bad]["in_cooldown"] and state[bad]["strikes"] == n and state[bad]["cooldowns"] == 0
        assert len(flaky.state.calls) == 2  # still in rotation: it was tried first both times
        client.completions.create(model="tiny-p60", prompt="request 3", max_tokens=2)
        state = {w["url"]: w for w in _workers(url)}
        assert state[bad]["in_cooldown"] and state[bad]["cooldowns"] == 1  # a third strike: at fault
        assert not state[good]["in_cooldown"] and state[good]["cooldowns"] == 0
        client.completions.create(model="tiny-p60", prompt="request 4", max_tokens=2)
        assert len(flaky.state.calls) == 3  # out of rotation now
        assert _metric(url, "family_poison_requests_total") == 0


# --- limits before work --------------------------------------------------------------------------


def test_a_10mb_body_is_a_413_before_it_is_read(tiny_family):
    with fleet(tiny_family, {"tiny-p60": 1}) as (url, client, _):
        big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "word " * 2_000_000}]}).encode()
        assert len(big) > 10_000_000
        with httpx.Client(timeout=30) as c:
            c.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "warm", "max_tokens": 1})
            for body in (big, iter([big[i:i + 65536] for i in range(0, len(big), 65536)])):  # Content-Length, then chunked
                start = time.perf_counter()
                r = c.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                elapsed = time.perf_counter() - start
                assert r.status_code == 413, r.text
                assert r.json()["error"]["code"] == "request_too_large" and set(r.json()["error"]) == {"message", "type", "param", "code"}
                assert elapsed < 1.0, elapsed  # tokenizing it took 12.5 s before; loopback upload included
            # Under the body limit but longer than any context can hold: refused before tokenizing.
            start = time.perf_counter()
            r = c.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x" * 900_000})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            assert "characters" in r.json()["error"]["message"] and time.perf_counter() - start < 1.0
            assert client.completions.create(model="tiny", prompt="still here", max_tokens=2).choices  # the same connection pool serves on
        assert _metric(url, 'family_refused_requests_total{code="request_too_large"}') == 2


# --- keys: caps, concurrency, hashes and rotation ------------------------------------------------


def test_a_keys_cap_holds_against_a_body_that_asks_for_more(tiny_family):
    fam = load_family(tiny_family)
    p100, p80 = fam.registry.member("tiny-p100"), fam.registry.member("tiny-p80")
    between = (p100.bytes["float32"] + p80.bytes["float32"]) / 2 / 1e9
    keys = [KeySpec(key="sk-fast-only-1", name="fast", cap=KeyCap(max_ttft_ms=100)),
            KeySpec(key="sk-no-parent-1", name="small", budget=Budget(max_ttft_ms=1000), cap=KeyCap(max_memory_gb=between))]
    with fleet(tiny_family, {"tiny-p100": 1, "tiny-p80": 1, "tiny-p60": 1}, auth=Auth(keys), live=False) as (url, _, _):
        fast = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-fast-only-1", max_retries=0)
        # ttft: p100 400 ms, p80 150 ms, p60 30 ms. Asking for 1000 ms (or nothing) would get the parent.
        for budget in ({"max_ttft_ms": 1000}, {}, {"max_ttft_ms": 1, "allow_best_effort": True}):
            raw = fast.completions.with_raw_response.create(model="tiny", prompt="a", max_tokens=2, extra_body={"budget": budget})
            assert raw.headers["x-family-member"] == "tiny-p60", budget
        with pytest.raises(openai.UnprocessableEntityError) as info:  # pinned past the cap: narrowed, so nothing fits
            fast.completions.create(model="tiny-p100", prompt="a", max_tokens=2)
        assert info.value.body["param"] == "budget.max_ttft_ms"
        small = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-no-parent-1", max_retries=0)
        raw = small.completions.with_raw_response.create(model="tiny", prompt="a", max_tokens=2, extra_body={"budget": {"max_memory_gb": 100}})
        assert raw.headers["x-family-member"] == "tiny-p80"
        # The same body without a key gets the parent: the cap, not the body, decided.
        assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2},
                          headers={"authorization": "Bearer sk-no-parent-1", "x-slo-ttft-ms": "1000"}).headers["x-family-member"] == "tiny-p80"


def test_a_pinned_member_outside_the_keys_list_is_403_and_routing_stays_inside_it(tiny_family):
    keys = [KeySpec(key="sk-members-12", name="members", members=["tiny-p80", "tiny-p60"]), KeySpec(key="sk-anything-1", name="any")]
    with fleet(tiny_family, {"tiny-p100": 1, "tiny-p80": 1, "tiny-p60": 1}, auth=Auth(keys), live=False) as (url, _, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-members-12", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.chat.completions.create(model="tiny-p100", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert info.value.body["code"] == "model_not_allowed" and info.value.body["param"] == "model"
        assert client.completions.with_raw_response.create(model="tiny", prompt="a", max_tokens=2).headers["x-family-member"] == "tiny-p80"
        assert client.completions.create(model="tiny-p60", prompt="a", max_tokens=2).model == "tiny-p60"
        other = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-anything-1", max_retries=0)
        assert other.completions.with_raw_response.create(model="tiny", prompt="a", max_tokens=2).headers["x-family-member"] == "tiny-p100"


def test_a_keys_concurrency_limit_answers_429_and_frees_the_slot_when_a_stream_ends(tiny_family):
    auth = Auth([KeySpec(key="sk-one-at-a-time", name="single", max_concurrent=1)])
    with gateway(tiny_family, [("tiny-p60", stub_worker("tiny-p60", stream_s=20))], auth=auth) as (url, _, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-one-at-a-time", max_retries=0)
        stream = client.completions.create(model="tiny", prompt="long", max_tokens=200, stream=True)
        assert next(iter(stream)).choices[0].text == "x"  # in flight
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="tiny", prompt="second", max_tokens=2)
        assert info.value.body["code"] == "concurrency_limit_exceeded" and int(info.value.response.headers["retry-after"]) >= 1
        stream.close()  # the caller leaves mid-stream: its slot comes back
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.completions.create(model="tiny", prompt="third", max_tokens=2).choices
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the slot was never given back"
                time.sleep(0.1)
        # Requests that are over are not counted: back to back on the freed slot.
        assert client.completions.create(model="tiny", prompt="fourth", max_tokens=2).choices


def test_keys_are_stored_hashed_and_rotate_without_a_restart(tiny_family, tmp_path):
    from typer.testing import CliRunner

    from family.cli import _register, app

    old, new = "sk-old-key-0001", "sk-new-key-0002"
    _register()
    printed = CliRunner().invoke(app, ["hash-key", old])
    assert printed.exit_code == 0 and printed.output.strip() == hashlib.sha256(old.encode()).hexdigest() == hash_key(old)
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {{sha256: {hash_key(old)}, name: team}}\n")
    assert old not in path.read_text()
    fam = load_family(tiny_family)
    auth = Auth.from_file(path, members=set(fam.registry.names()))
    worker = create_worker(fam.member_dir("tiny-p60"), "tiny-p60", max_model_len=256)
    with gateway(tiny_family, [("tiny-p60", worker)], auth=auth) as (url, _, _):
        def status(key):
            return httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 1},
                              headers={"authorization": f"Bearer {key}"}).status_code

        assert (status(old), status(new)) == (200, 401)
        path.write_text(f"keys:\n  - {{sha256: {hash_key(new)}, name: team, max_concurrent: 2}}\n")  # rotate
        time.sleep(1.1)  # the file is looked at once a second at most
        assert (status(old), status(new)) == (401, 200)
        path.write_text("keys: [{sha256: not-a-hash, name: broken}]\n")  # a bad edit keeps the keys in force
        time.sleep(1.1)
        assert status(new) == 200


@pytest.mark.parametrize("text, message", [
    ("keys: [{sha256: %s, name: x, members: [tiny-p999]}]\n" % hash_key("sk-some-key-1"), "unknown members tiny-p999"),
    ("keys: [{sha256: %s, key: sk-some-key-1, name: x}]\n" % hash_key("sk-some-key-1"), "exactly one of sha256"),
    ("keys: [{sha256: abc, name: x}]\n", "64 hex digits"),
    ("keys: [{key: sk-some-key-1, name: x}, {sha256: %s, name: y}]\n" % hash_key("sk-some-key-1"), "listed twice"),
    ("keys: [{key: sk-some-key-1, name: x, cap: {max_tokens: 5}}]\n", "cap.max_tokens"),
])
def test_a_bad_keys_file_is_one_clear_line(tiny_family, tmp_path, text, message):
    from family.errors import FamilyError

    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(FamilyError, match=message.replace(".", r"\.")):
        Auth.from_file(path, members=set(load_family(tiny_family).registry.names()))
