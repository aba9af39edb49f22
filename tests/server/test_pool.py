"""The upstream pool against real workers (health, load from /metrics, cooldown and recovery), and the
fleet and API-key files it is configured from."""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import httpx
import pytest

from family.errors import FamilyError
from family.registry import load_family
from server.auth import Auth
from server.errors import APIError
from server.fleet import WorkerSpec, load_fleet
from server.metrics import GatewayMetrics
from server.pool import EWMA, RATIO_HALF_LIFE_S, Pool, Speed
from server.worker_torch import create_app as create_worker
from tests.server.conftest import free_port, serve
from tests.server.gateway_fixtures import tiny_family  # noqa: F401  (fixture)


async def _with_pool(specs, fn, **kw):
    async with aiohttp.ClientSession() as session:
        pool = Pool(specs, session, GatewayMetrics(), **kw)
        await pool.check_all()
        return await fn(pool)


def test_health_checks_read_running_and_waiting_from_a_real_worker(tiny_member_dir):
    with serve(create_worker(tiny_member_dir, "tiny-p70", max_model_len=256, max_batch=1)) as url:
        spec = WorkerSpec(url=url, member="tiny-p70", device_class="cpu")

        def long_request():
            httpx.post(f"{url}/v1/completions", json={"model": "tiny-p70", "prompt": "a", "max_tokens": 200, "ignore_eos": True},
                       timeout=60)

        async def busy(pool):
            w = pool.workers[0]
            assert w.healthy and w.available() and w.running == 0 and w.waiting == 0
            threads = [threading.Thread(target=long_request) for _ in range(3)]
            for t in threads:
                t.start()
            for _ in range(100):  # until the worker reports one running (max_batch 1) and two waiting
                await pool.check(w)
                if w.running == 1 and w.waiting == 2:
                    break
                await asyncio.sleep(0.05)
            for t in threads:
                t.join()
            return w.running, w.waiting, w.load()

        assert asyncio.run(_with_pool([spec], busy)) == (1.0, 2.0, 3.0)


def test_a_dead_worker_cools_down_then_returns_when_its_checks_pass(tiny_member_dir):
    port = free_port()
    spec = WorkerSpec(url=f"http://127.0.0.1:{port}", member="tiny-p70", device_class="cpu")

    async def scenario(pool):
        w = pool.workers[0]
        assert not w.healthy and not w.available() and "health check failed" in w.last_error  # refused: out at once
        first_cooldown = w.cooldown_until
        await pool.check(w)
        assert not w.available() and "health check failed" in w.last_error
        assert w.failures == 1 and w.cooldown_until == first_cooldown  # probing a dead worker does not push its return back
        with serve(create_worker(tiny_member_dir, "tiny-p70", max_model_len=256), port=port):
            await asyncio.sleep(0.25)  # past the (short) cooldown
            await pool.check(w)
            assert w.healthy and w.available() and w.failures == 0 and w.last_error is None
        await pool.check(w)  # stopped again
        return w.healthy

    assert asyncio.run(_with_pool([spec], scenario, base_cooldown=0.05, max_cooldown=0.1)) is False


def test_failed_requests_put_a_worker_in_a_growing_cooldown():
    spec = WorkerSpec(url="http://127.0.0.1:9", member="m", device_class="cpu")

    async def scenario(pool):
        w = pool.workers[0]
        w.healthy, w.failures, w.cooldown_until = True, 0, 0.0
        assert w.available()
        pool.fail(w, "HTTP 500")
        first = w.cooldown_until
        pool.fail(w, "HTTP 502")  # failing requests again: the cooldown grows
        return w.available(), w.last_error, w.cooldown_until > first

    assert asyncio.run(_with_pool([spec], scenario)) == (False, "HTTP 502", True)


# --- fleet.yaml ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("workers:\n  - url: http://10.0.0.5:8000\n    member: tiny-p999\n    device_class: h100\n", "unknown member 'tiny-p999'"),
    ("workers:\n  - url: not a url\n    member: tiny-p80\n    device_class: h100\n", "workers.0.url"),
    ("workers:\n  - url: ftp://host/x\n    member: tiny-p80\n    device_class: h100\n", "workers.0.url"),
    ("workers:\n  - url: http://h:1\n    member: tiny-p80\n", "workers.0.device_class: Field required"),
    ("workers:\n  - url: http://h:1\n    member: tiny-p80\n    device_class: cpu\n    gpu: yes\n", "workers.0.gpu"),
    ("workers: []\n", "workers"),
    ("workers: [\n", "not valid YAML"),
    ("workers:\n  - url: http://h:1\n    member: tiny-p80\n    device_class: cpu\n"
     "  - url: http://h:1/\n    member: tiny-p80\n    device_class: cpu\n", "listed twice for member 'tiny-p80'"),
])
def test_a_bad_fleet_file_is_one_clear_line(tiny_family, tmp_path, text, message):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(FamilyError) as info:
        load_fleet(path, load_family(tiny_family))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_good_fleet_file_mixes_gpu_and_cpu_nodes(tiny_family, tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "workers:\n"
        "  - {url: 'http://10.0.0.5:8000', member: tiny-p100, device_class: h100, api_key: sk-node-secret}\n"
        "  - {url: 'http://10.0.0.6:8000/', member: tiny-p60, device_class: cpu-2core}\n"
        "  - {url: 'http://10.0.0.6:8000', member: tiny-p80, device_class: cpu-2core}\n"  # one worker, two members
    )
    specs = load_fleet(path, load_family(tiny_family))
    assert [(s.base, s.member, s.device_class, s.api_key) for s in specs] == [
        ("http://10.0.0.5:8000", "tiny-p100", "h100", "sk-node-secret"), ("http://10.0.0.6:8000", "tiny-p60", "cpu-2core", None),
        ("http://10.0.0.6:8000", "tiny-p80", "cpu-2core", None)]
    with pytest.raises(FamilyError, match="not found"):
        load_fleet(tmp_path / "missing.yaml", load_family(tiny_family))


# --- keys.yaml -----------------------------------------------------------------------------------


def test_keys_file_rate_limits_and_admin(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - {key: sk-team-a-123, name: team-a, requests_per_minute: 120, budget: {max_ttft_ms: 100}}\n"
                    "  - {key: sk-ops-12345, name: ops, admin: true}\n")
    auth = Auth.from_file(path)
    team = auth.identify("Bearer sk-team-a-123")
    assert team.name == "team-a" and team.budget.max_ttft_ms == 100
    with pytest.raises(APIError) as info:
        auth.identify("Bearer nope")
    assert info.value.status_code == 401
    with pytest.raises(APIError) as info:
        auth.require_admin(team)
    assert info.value.status_code == 403
    auth.require_admin(auth.identify("Bearer sk-ops-12345"))
    auth.admit(team)
    auth.admit(team)  # a burst of 2 (120/min = 2/s)
    with pytest.raises(APIError) as info:
        auth.admit(team)
    assert info.value.status_code == 429 and int(info.value.headers["Retry-After"]) >= 1
    for bad in ("keys: [{key: short, name: x}]\n", "keys: [{key: sk-long-enough, name: x, budget: {max_ttft_ms: -1}}]\n"):
        path.write_text(bad)
        with pytest.raises(FamilyError, match="invalid"):
            Auth.from_file(path)


def test_an_observed_ratio_fades_back_to_the_registry_figure_while_nothing_is_observed():
    speed = Speed()
    for _ in range(30):  # answers 3x slower than predicted
        speed.observe(0.1, 0.3, 0.01, 0.03, now=100.0)
    assert speed.ratios(now=100.0) == pytest.approx((3.0, 3.0), rel=0.01)
    assert speed.ratios(now=100.0 + RATIO_HALF_LIFE_S) == pytest.approx((2.0, 2.0), rel=0.01)  # the excess halves
    assert speed.ratios(now=100.0 + 20 * RATIO_HALF_LIFE_S) == pytest.approx((1.0, 1.0), abs=1e-3)
    # A new observation folds into what the ratio has faded to, not into the old figure.
    speed.observe(0.1, 0.1, 0.01, 0.01, now=100.0 + RATIO_HALF_LIFE_S)
    assert speed.ratios(now=100.0 + RATIO_HALF_LIFE_S)[0] == pytest.approx((1 - EWMA) * 2.0 + EWMA * 1.0, rel=0.01)
