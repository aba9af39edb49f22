"""A tiny family on disk with registry figures for routing, and a fleet of real torch workers behind
the gateway, all over real HTTP on loopback (shared by the gateway, router and pool tests)."""

from __future__ import annotations

import contextlib

import openai
import pytest

from family.registry import load_family
from loadtests.tinyfamily import build_tiny_family
from server.fleet import WorkerSpec
from server.gateway import create_app
from server.worker_torch import create_app as create_worker
from tests.server.conftest import serve

DEVICE = "test-cpu"
# Accuracy figures are loadtests.tinyfamily's (parent 1.0, p80 0.9, p60 0.7); these latency figures put
# the members far apart so each row of the budget table has exactly one right answer.
LATENCY = {
    "tiny-p100": {"a0": 0.400, "a1": 0.0, "a2": 0.0, "a3": 0.0, "b0": 0.040, "b1": 0.0, "b2": 0.0},
    "tiny-p80": {"a0": 0.150, "a1": 0.0, "a2": 0.0, "a3": 0.0, "b0": 0.020, "b1": 0.0, "b2": 0.0},
    "tiny-p60": {"a0": 0.030, "a1": 0.0, "a2": 0.0, "a3": 0.0, "b0": 0.005, "b1": 0.0, "b2": 0.0},
}


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """A tiny family on disk with registry figures (test data) and a latency profile per member."""
    return build_tiny_family(tmp_path_factory.mktemp("family"), DEVICE, latency=LATENCY)


@contextlib.contextmanager
def fleet(family_root, members_workers: dict[str, int], worker_kwargs: dict | None = None, **gateway_kwargs):
    """Real torch workers (n per member) and the gateway in front of them."""
    fam = load_family(family_root)
    worker_kwargs = {"max_model_len": 256, "max_batch": 4, **(worker_kwargs or {})}
    with contextlib.ExitStack() as stack:
        specs = []
        for name, n in members_workers.items():
            for _ in range(n):
                url = stack.enter_context(serve(create_worker(fam.member_dir(name), name, **worker_kwargs)))
                specs.append(WorkerSpec(url=url, member=name, device_class=DEVICE))
        gw = stack.enter_context(serve(create_app(fam, specs, health_interval=0.3, **gateway_kwargs)))
        yield gw, openai.OpenAI(base_url=f"{gw}/v1", api_key="none", max_retries=0), specs
