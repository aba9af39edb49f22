"""Real processes on loopback for load and reliability scenarios: `family worker`s, optional slow
proxies in front of some, a fleet.yaml, and `family serve --fleet` in front of them all; or the embedded
default (`family serve` starting its own workers). Every process is started here, stopped here, by pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from family.profile import wait_healthy, worker_threads
from family.registry import load_family

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def start_family_cli(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "family.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env or _env())


@dataclass
class WorkerConf:
    member: str
    max_batch: int = 8
    max_waiting: int = 64
    slow: dict | None = None  # {"delay_s": s before the response, "per_chunk_s": s per streamed line}: behind a slow proxy


@dataclass
class WorkerProc:
    conf: WorkerConf
    port: int
    proc: subprocess.Popen | None = None
    proxy: subprocess.Popen | None = None
    proxy_port: int | None = None
    log: Path | None = None

    @property
    def direct_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """What the gateway calls: the slow proxy when there is one."""
        return f"http://{LOOPBACK}:{self.proxy_port}" if self.proxy_port else self.direct_url


@dataclass
class ProcessFleet:
    """Workers + gateway as real processes. Use as a context manager."""

    family_dir: Path
    workers: list[WorkerConf]
    device_class: str
    log_dir: Path
    health_interval: float = 0.5
    max_model_len: int | None = None
    gateway_args: list[str] = field(default_factory=list)
    ready_timeout: float = 300.0
    procs: list[WorkerProc] = field(default_factory=list, init=False)
    gateway: subprocess.Popen | None = field(default=None, init=False)
    gateway_port: int = field(default=0, init=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway_port}"

    def _start_worker(self, w: WorkerProc) -> None:
        fam = load_family(self.family_dir, verify="none")
        args = ["worker", "--member-dir", str(fam.member_dir(w.conf.member)), "--name", w.conf.member, "--engine", "torch",
                "--host", LOOPBACK, "--port", str(w.port), "--max-batch", str(w.conf.max_batch), "--max-waiting", str(w.conf.max_waiting),
                "--threads", str(worker_threads(len(self.workers)))]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        w.proc = start_family_cli(args, w.log)

    def start(self) -> "ProcessFleet":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i, conf in enumerate(self.workers):
                w = WorkerProc(conf, free_port(), log=self.log_dir / f"worker{i}-{conf.member}.log")
                self.procs.append(w)
                self._start_worker(w)
            for w in self.procs:
                wait_healthy(w.direct_url, self.ready_timeout, w.proc, f"worker {w.conf.member} (log {w.log})")
                if w.conf.slow:
                    w.proxy_port = free_port()
                    cmd = [sys.executable, "-m", "loadtests.slowproxy", "--upstream", w.direct_url, "--port", str(w.proxy_port),
                           "--delay-s", str(w.conf.slow.get("delay_s", 0.0)), "--per-chunk-s", str(w.conf.slow.get("per_chunk_s", 0.0))]
                    with open(self.log_dir / f"proxy-{w.proxy_port}.log", "ab") as out:
                        w.proxy = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())
                    wait_healthy(w.url, 60, w.proxy, "slow proxy")
            fleet = {"workers": [{"url": w.url, "member": w.conf.member, "device_class": self.device_class} for w in self.procs]}
            fleet_file = self.log_dir / "fleet.yaml"
            fleet_file.write_text(yaml.safe_dump(fleet, sort_keys=False))
            self.gateway_port = free_port()
            self.gateway = start_family_cli(
                ["serve", "--family", str(self.family_dir), "--fleet", str(fleet_file), "--host", LOOPBACK, "--port", str(self.gateway_port),
                 "--device-class", self.device_class, "--health-interval", str(self.health_interval), *self.gateway_args],
                self.log_dir / "gateway.log")
            wait_healthy(self.url, self.ready_timeout, self.gateway, f"gateway (log {self.log_dir / 'gateway.log'})")
        except BaseException:
            self.stop()
            raise
        return self

    def kill_worker(self, i: int, sig: int = signal.SIGKILL) -> None:
        w = self.procs[i]
        if w.proc and w.proc.poll() is None:
            w.proc.send_signal(sig)
            w.proc.wait(timeout=30)

    def restart_worker(self, i: int, wait: bool = True) -> None:
        """Start the worker again on the same port (the fleet file does not change)."""
        w = self.procs[i]
        self._start_worker(w)
        if wait:
            wait_healthy(w.direct_url, self.ready_timeout, w.proc, f"worker {w.conf.member}")

    def worker_state(self, i: int) -> dict | None:
        """The gateway's view of worker i (from /v1/family)."""
        data = httpx.get(f"{self.url}/v1/family", timeout=10).json()
        return next((w for w in data["workers"] if w["url"].rstrip("/") == self.procs[i].url), None)

    def stop(self) -> None:
        stop_process(self.gateway)
        for w in self.procs:
            stop_process(w.proxy)
            stop_process(w.proc)

    def __enter__(self) -> "ProcessFleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EmbeddedGateway:
    """`family serve --family DIR` as the product runs it: it starts one local worker per servable member."""

    def __init__(self, family_dir: Path, log: Path, *, port: int | None = None, device_class: str = "cpu-2core",
                 extra: list[str] | None = None, ready_timeout: float = 600.0):
        self.family_dir, self.log, self.port = Path(family_dir), Path(log), port or free_port()
        self.device_class, self.extra, self.ready_timeout = device_class, extra or [], ready_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> "EmbeddedGateway":
        self.proc = start_family_cli(["serve", "--family", str(self.family_dir), "--host", LOOPBACK, "--port", str(self.port),
                                      "--device-class", self.device_class, *self.extra], self.log)
        try:
            wait_healthy(self.url, self.ready_timeout, self.proc, f"gateway (log {self.log})")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        import psutil

        children = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                children = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                pass
        stop_process(self.proc, timeout=60)  # the gateway stops its own workers on the way out ...
        for c in children:  # ... and if it could not, we stop the ones it started
            try:
                c.terminate()
                c.wait(timeout=20)
            except psutil.TimeoutExpired:
                c.kill()
            except psutil.Error:
                pass
