"""Latency profiles: each member measured through the engine that serves it, on this hardware.

A profile starts `family worker` as a separate process, as `family serve` would (torch: one worker
for every member; vLLM: one per member), waits for /health, and sends streaming completions over
HTTP at several concurrencies and prompt lengths, timing the first token (TTFT), the gaps between
tokens (TPOT) and the whole request; the members of one worker are measured interleaved
(`schedule`). Peak memory is the worker process tree's largest resident set. family/ never imports
server/: it speaks the worker protocol only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from tqdm import tqdm

from family.errors import FamilyError
from family.registry import LatencySample


@dataclass(frozen=True)
class Shape:
    prompt_tokens: int
    output_tokens: int
    concurrency: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_threads(n_workers: int) -> int:
    """CPU threads per torch worker when `n_workers` separate worker processes share this machine: its
    cores shared out evenly (the load-test harness's fleets of one process per member). Left at torch's
    default, every worker starts one thread per core, and N workers' thread pools on the same cores slow
    each other down several times over. (`family serve` runs one shared worker with every core instead.)
    """
    return max(1, (os.cpu_count() or 1) // max(1, n_workers))


def wait_healthy(url: str, timeout: float = 300.0, proc: subprocess.Popen | None = None, what: str = "worker") -> None:
    """Poll `url`/health until it answers 200; fail as soon as `proc` (the process behind it) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FamilyError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise FamilyError(f"{what} not ready after {timeout:.0f} s")


def worker_groups(names: list[str], engine: str) -> list[list[str]]:
    """Which members share a worker process: with torch one process serves them all (one runtime, one
    thread pool, its scheduler gives the cores to whichever members have work); vLLM serves one model
    per process. `family serve` starts its workers this way, and `family profile` measures them so."""
    return [list(names)] if engine == "torch" else [[n] for n in names]


def worker_log_name(group: list[str], engine: str) -> str:
    """The log file of the worker serving `group`."""
    return f"worker-{'shared' if len(group) > 1 else group[0]}-{engine}.log"


def _end_with_parent() -> None:
    """Run in the worker between fork and exec (Linux): the kernel sends it SIGTERM when the process
    that started it dies, however it dies. A gateway or profiler killed with SIGKILL (an OOM kill, a
    container runtime, `kill -9`) runs no cleanup, and its worker would otherwise keep its port, its
    memory and its cores until someone finds it. The setting survives exec (vLLM's worker execs)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class WorkerProcess:
    """`family worker` in a subprocess, with its peak memory sampled in the background. The worker ends
    with the *thread* that starts it (Linux: PR_SET_PDEATHSIG), so start it from the main thread."""

    def __init__(self, member_dir: Path | list[Path], name: str | list[str], engine: str, *, dtype: str = "float32",
                 log: Path | None = None, ready_timeout: float | None = 600.0, threads: int | None = None):
        """Start the worker; wait until it is ready unless `ready_timeout` is None (then call wait_ready).

        `member_dir`, `name`: one member, or lists of them served by one torch worker (one engine).
        `threads`: the torch engine's CPU threads (`family worker --threads`; None = torch's default).

        Peak memory is the largest sum of resident set sizes over the worker's process tree, sampled
        every 0.2 s (pages shared between a parent and its forked children count once per process).
        """
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        dirs, names = ([member_dir], [name]) if isinstance(name, str) else (list(member_dir), list(name))
        members = [arg for d, n in zip(dirs, names) for arg in ("--member-dir", str(d), "--name", n)]
        self.command = [sys.executable, "-m", "family.cli", "worker", *members, "--engine", engine, "--port", str(self.port), "--dtype", dtype,
                        *(["--threads", str(threads)] if threads else [])]
        out = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                     preexec_fn=_end_with_parent if sys.platform == "linux" else None)
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample_memory, daemon=True).start()
        if ready_timeout is not None:
            self.wait_ready(ready_timeout)

    def _sample_memory(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.proc.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 600.0) -> None:
        try:
            wait_healthy(self.url, timeout, self.proc, what=f"worker {self.url}" + (f" (log: {self.log})" if self.log else ""))
        except FamilyError:
            self.stop()
            raise

    def serving(self, name: str) -> dict | None:
        """How the worker serves `name` (the torch engine's /health `serving`: dtype and dense or factored
        projections, chosen by measurement at load), or None where the engine does not say (vLLM)."""
        try:
            return httpx.get(f"{self.url}/health", timeout=10).json().get("serving", {}).get(name)
        except (httpx.HTTPError, ValueError, AttributeError):
            return None

    def stop(self) -> None:
        """Terminate the worker and every process it started (vLLM runs an engine-core child)."""
        self._stop.set()
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def prompt_of(tokenizer, text_ids: list[int], n: int, offset: int = 0) -> str:
    return tokenizer.decode(text_ids[offset : offset + n])


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, output_tokens: int, endpoint: str = "chat") -> dict:
    """One streaming request; times to the first content token, between tokens, and to the end."""
    body = {"model": model, "max_tokens": output_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    start = time.perf_counter()
    stamps, usage = [], None
    async with client.stream("POST", f"{url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json=body) as r:
        if r.status_code != 200:
            raise FamilyError(f"worker answered {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise FamilyError(f"worker streamed an error: {chunk['error'].get('message')}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            choice = (chunk.get("choices") or [{}])[0]
            text = choice.get("delta", {}).get("content") if endpoint == "chat" else choice.get("text")
            if text:
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    if not stamps or usage is None:
        raise FamilyError("worker streamed no tokens or no usage")
    n = usage["completion_tokens"]
    return {
        "ttft": stamps[0] - start, "e2e": end - start, "tokens": n, "prompt_tokens": usage["prompt_tokens"],
        # mean gap between output tokens (a chunk may carry more than one token: count from usage)
        "tpot": (stamps[-1] - stamps[0]) / max(1, n - 1),
    }


async def _burst(client: httpx.AsyncClient, url: str, model: str, prompts: list[str], shape: Shape,
                 endpoint: str) -> tuple[list[dict], float]:
    """`shape.concurrency` simultaneous requests: their timings, and the burst's wall time."""
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(client, url, model, p, shape.output_tokens, endpoint) for p in prompts))
    return list(results), time.perf_counter() - start


def _sample(shape: Shape, results: list[dict], walls: list[float]) -> LatencySample:
    """Means over every request of one shape (all its rounds)."""
    return LatencySample(
        prompt_tokens=round(statistics.mean(x["prompt_tokens"] for x in results)),
        output_tokens=shape.output_tokens,
        concurrency=shape.concurrency,
        ttft_s=statistics.mean(x["ttft"] for x in results),
        tpot_s=statistics.mean(x["tpot"] for x in results),
        e2e_s=statistics.mean(x["e2e"] for x in results),
        throughput_tok_s=sum(x["tokens"] for x in results) / sum(walls),
    )


def schedule(names: list[str], shapes: list[Shape], rounds: int) -> list[tuple[Shape, int, str]]:
    """The order of the bursts, (shape, round, member): for each shape, each round visits every
    member, in reverse order every other round. Members are compared with each other (the router
    picks between them), and a shared machine's speed drifts over a minute by more than a 0.9 member
    differs from its parent: measured one after another, a member's whole profile lands on its own
    stretch of that drift (on a 2-core host p90 and p70 came out slower than the parent, where
    alternating requests give 1.04x and 1.21x). Interleaved, every member sees the same drift."""
    return [(shape, r, n) for shape in shapes for r in range(rounds) for n in (names if r % 2 == 0 else names[::-1])]


def profile_members(url: str, members: list[tuple[str, object, list[int]]], shapes: list[Shape], rounds: int = 2,
                    progress: bool = True, endpoint: str = "chat") -> dict[str, list[LatencySample]]:
    """Measure every shape for every member on one running worker, in `schedule`'s interleaved order
    (a warm-up request per member first). `members`: (name, tokenizer, token ids of the text prompts
    are cut from). With `endpoint="chat"` the prompt is one user message of about `prompt_tokens`
    text tokens (the chat template adds a few; the sample records the worker's own count); with
    "completions" it is the raw text."""
    by_name = {name: (tok, ids) for name, tok, ids in members}
    names = list(by_name)
    order = schedule(names, shapes, rounds)
    timings: dict[tuple[str, Shape], tuple[list[dict], list[float]]] = {(n, s): ([], []) for n in names for s in shapes}

    async def run(bar) -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            for n, (tok, ids) in by_name.items():  # warm-up
                await _burst(client, url, n, [prompt_of(tok, ids, 16)], Shape(16, 4, 1), endpoint)
            for shape, r, n in order:
                tok, ids = by_name[n]
                prompts = [prompt_of(tok, ids, shape.prompt_tokens, offset=997 * (r * shape.concurrency + i)) for i in range(shape.concurrency)]
                results, wall = await _burst(client, url, n, prompts, shape, endpoint)
                timings[(n, shape)][0].extend(results)
                timings[(n, shape)][1].append(wall)
                bar.update(shape.output_tokens * shape.concurrency)
                s = _sample(shape, results, [wall])
                bar.set_postfix(member=n, p=shape.prompt_tokens, c=shape.concurrency, ttft_ms=f"{s.ttft_s * 1e3:.0f}",
                                tpot_ms=f"{s.tpot_s * 1e3:.0f}", tok_s=f"{s.throughput_tok_s:.0f}")

    total = sum(s.output_tokens * s.concurrency for s, _, _ in order)
    desc = f"profile {names[0]}" if len(names) == 1 else f"profile {len(names)} members, interleaved"
    with tqdm(total=total, desc=desc, unit="tok", disable=not progress) as bar:
        asyncio.run(run(bar))
    return {n: [_sample(s, *timings[(n, s)]) for s in shapes] for n in names}


def profile_worker(url: str, model: str, tokenizer, text_ids: list[int], shapes: list[Shape], rounds: int = 2,
                   progress: bool = True, endpoint: str = "chat") -> list[LatencySample]:
    """One member's profile on a running worker (profile_members for one)."""
    return profile_members(url, [(model, tokenizer, text_ids)], shapes, rounds, progress, endpoint)[model]
