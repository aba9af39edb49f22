"""Short forms of the load test and the reliability scenarios, against real processes on loopback.

The locust runs go through subprocesses (`python -m loadtests.run` / `loadtests.compare`), so locust's
gevent monkey-patching never reaches this pytest process. Goodput thresholds are not asserted here (a
tiny random family on a shared 2-core CI box has no stable speed); lost requests, 5xx and broken
streams are.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadtests import reliability
from loadtests.tinyfamily import DEVICE_CLASS

pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check(res: dict) -> None:
    assert res["ok"], json.dumps(res, indent=2, default=str)[:6000]


def test_locust_run_report(fleet, tmp_path):
    _run(["loadtests.run", "--gateway", fleet.url, "--duration", "10", "--users", "4", "--out", str(tmp_path)], timeout=240)
    rep = json.loads((tmp_path / "report.json").read_text())
    o = rep["overall"]
    assert o["requests"] > 0 and o["failed"] == 0 and o["server_5xx"] == 0, o
    assert (tmp_path / "report.png").stat().st_size > 10_000
    lines = (tmp_path / "outcomes.jsonl").read_text().splitlines()
    assert len(lines) == o["requests"]
    first = json.loads(lines[0])
    assert {"budget", "met", "member", "ttft_ms", "tpot_ms", "e2e_ms"} <= set(first)


def test_compare_three_policies(fleet, tiny_family_dir, tmp_path):
    _run(["loadtests.compare", "--family", str(tiny_family_dir), "--gateway", fleet.url, "--device-class", DEVICE_CLASS,
          "--duration", "12", "--users", "6", "--pause", "1", "--out", str(tmp_path)], timeout=300)
    rep = json.loads((tmp_path / "compare.json").read_text())
    assert set(rep["results"]) == {"gateway", "parent", "static"}
    for policy, s in rep["results"].items():
        o = s["overall"]
        assert o["requests"] > 0, policy
        assert o["failed"] == 0 and o["server_5xx"] == 0, (policy, o)
    # Pinned policies are served by the member they name; the parent baseline only by the parent.
    assert set(rep["results"]["parent"]["overall"]["served_by"]) == {"tiny-p100"}
    # Tight-memory requests never land on the parent when the gateway routes them.
    assert "tiny-p100" not in rep["results"]["gateway"]["by_class"]["tight_memory"]["served_by"]
    assert (tmp_path / "compare.png").is_file() and "| gateway |" in (tmp_path / "compare.md").read_text()


def test_fuzz_schema(fleet, tiny_family_dir, tmp_path):
    _check(reliability.fuzz(tiny_family_dir, DEVICE_CLASS, tmp_path, fleet=fleet, max_examples=8, max_time_s=60))


def test_kill_worker_under_load(fleet, tiny_family_dir, tmp_path):
    _check(reliability.kill_worker(tiny_family_dir, DEVICE_CLASS, tmp_path, fleet=fleet, load_s=16, kill_at=4, down_s=3))


def test_slow_worker(fault_fleet, tiny_family_dir, tmp_path):
    _check(reliability.slow_worker(tiny_family_dir, DEVICE_CLASS, tmp_path, fleet=fault_fleet, requests_n=30))


def test_full_queue(fault_fleet, tiny_family_dir, tmp_path):
    _check(reliability.full_queue(tiny_family_dir, DEVICE_CLASS, tmp_path, fleet=fault_fleet, member="tiny-p60", burst=10))


def test_corrupt_member(tiny_family_dir, tmp_path):
    res = reliability.corrupt_member(tiny_family_dir, DEVICE_CLASS, tmp_path, victim="tiny-p60")
    _check(res)
    assert res["mtime_preserved_flip"]["full_verify_detects"]


def test_hostile_input(fleet, tiny_family_dir, tmp_path):
    res = reliability.hostile_input(tiny_family_dir, DEVICE_CLASS, tmp_path, fleet=fleet, phase_s=8)
    _check(res)
    assert res["hostile"]["requests"] >= 15 and res["hostile"]["refuse_10mb_ms"]["n"] >= 2
