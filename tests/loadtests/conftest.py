"""Shared fleets for the short-form load and reliability tests: a tiny family (2-layer random Llama and
two truncated-SVD members, with test accuracy/latency figures) served by real `family worker` processes
behind a real `family serve --fleet` gateway, all on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.harness import ProcessFleet, WorkerConf
from loadtests.tinyfamily import DEVICE_CLASS, build_tiny_family


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory) -> Path:
    return build_tiny_family(tmp_path_factory.mktemp("lt-family"))


@pytest.fixture(scope="module")
def fleet(tiny_family_dir, tmp_path_factory):
    """One worker per member (parent first) and the gateway."""
    workers = [WorkerConf("tiny-p100"), WorkerConf("tiny-p80"), WorkerConf("tiny-p60")]
    with ProcessFleet(tiny_family_dir, workers, DEVICE_CLASS, tmp_path_factory.mktemp("fleet-logs"), health_interval=1.0) as f:
        yield f


@pytest.fixture(scope="module")
def fault_fleet(tiny_family_dir, tmp_path_factory):
    """The parent on two workers, the first behind a slow proxy; tiny-p60 on one worker with one batch
    slot and one queue slot (for the full-queue scenario)."""
    workers = [WorkerConf("tiny-p100", slow={"delay_s": 0.6, "per_chunk_s": 0.15}), WorkerConf("tiny-p100"),
               WorkerConf("tiny-p60", max_batch=1, max_waiting=1)]
    with ProcessFleet(tiny_family_dir, workers, DEVICE_CLASS, tmp_path_factory.mktemp("fault-fleet-logs"), health_interval=1.0) as f:
        yield f
