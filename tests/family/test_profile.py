"""Profiling through the serving engine: a real `family worker --engine torch` subprocess, spoken to
over HTTP only, stopped with its whole process tree afterwards."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import psutil
import pytest
from transformers import AutoTokenizer

from family import defaults
from family.errors import FamilyError
from family.profile import Shape, WorkerProcess, profile_worker, schedule, worker_threads
from family.text import tokenize


@pytest.fixture(scope="module")
def worker(tiny_parent_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    w = WorkerProcess(tiny_parent_dir, "tiny", "torch", log=log, ready_timeout=300)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def text(tiny_parent_dir):
    tok = AutoTokenizer.from_pretrained(tiny_parent_dir)
    return tok, tokenize(tok, defaults.EVAL_TEXT.read_text(encoding="utf-8")[:50_000]).tolist()


def test_worker_is_the_family_worker_command(worker):
    assert worker.command[1:4] == ["-m", "family.cli", "worker"]
    assert {"--member-dir", "--name", "--engine", "--port"} <= set(worker.command)
    assert httpx.get(f"{worker.url}/health").status_code == 200


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_profile_worker_measures_every_shape(worker, text, endpoint):
    tok, ids = text
    shapes = [Shape(8, 5, 1), Shape(40, 5, 1), Shape(8, 5, 3)]
    samples = profile_worker(worker.url, "tiny", tok, ids, shapes, rounds=1, progress=False, endpoint=endpoint)
    assert [(s.output_tokens, s.concurrency) for s in samples] == [(5, 1), (5, 1), (5, 3)]
    for s in samples:
        assert 0 < s.ttft_s < s.e2e_s and s.tpot_s > 0 and s.throughput_tok_s > 0
    # the sample records the worker's own prompt count: the longer prompt is longer, chat adds a template
    assert samples[1].prompt_tokens > samples[0].prompt_tokens >= 8 - 2
    if endpoint == "completions":
        assert abs(samples[0].prompt_tokens - 8) <= 2
    assert worker.peak_rss > 50e6  # a Python process with torch loaded


def test_members_of_one_worker_are_measured_interleaved():
    """Every member's burst of a shape comes before the next shape, and the order reverses each round,
    so that a drift of the machine's speed falls on every member alike."""
    a, b = Shape(8, 4, 1), Shape(32, 4, 2)
    order = schedule(["p100", "p90", "p70"], [a, b], rounds=2)
    assert [(s, n) for s, _, n in order] == [(a, "p100"), (a, "p90"), (a, "p70"), (a, "p70"), (a, "p90"), (a, "p100"),
                                             (b, "p100"), (b, "p90"), (b, "p70"), (b, "p70"), (b, "p90"), (b, "p100")]
    assert [r for _, r, _ in order[:6]] == [0, 0, 0, 1, 1, 1]
    assert schedule(["only"], [a], rounds=3) == [(a, 0, "only"), (a, 1, "only"), (a, 2, "only")]


def test_stop_ends_the_worker_tree(tiny_parent_dir):
    w = WorkerProcess(tiny_parent_dir, "tiny", "torch", ready_timeout=300)
    pids = [w.proc.pid] + [c.pid for c in psutil.Process(w.proc.pid).children(recursive=True)]
    w.stop()
    assert w.proc.poll() is not None
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{w.url}/health", timeout=2)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_ends_when_the_process_that_started_it_is_killed(tiny_parent_dir):
    """A gateway killed with SIGKILL runs no cleanup: its worker must not outlive it."""
    script = ("import time; from family.profile import WorkerProcess; "
              f"w = WorkerProcess({str(tiny_parent_dir)!r}, 'tiny', 'torch', ready_timeout=300); "
              "print(w.proc.pid, w.url, flush=True); time.sleep(600)")
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid, url = starter.stdout.readline().split()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        starter.kill()
        starter.wait(timeout=10)
    deadline = time.monotonic() + 60
    while _running(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(int(pid)), "the worker outlived the process that started it"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)


def test_a_worker_that_cannot_start_is_a_family_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FamilyError, match="exited with code"):
        WorkerProcess(tmp_path / "empty", "nothing", "torch", log=tmp_path / "w.log", ready_timeout=120)


def test_worker_threads_share_the_cores_out_evenly(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert [worker_threads(n) for n in (1, 2, 4)] == [2, 1, 1]  # never 0: an oversubscribed worker still gets a thread
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert [worker_threads(n) for n in (1, 4, 5)] == [16, 4, 3]
