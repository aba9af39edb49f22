"""Reliability scenarios against a real gateway and real workers, on loopback, each bounded in time.

    python -m loadtests.reliability kill-worker    --family DIR --device-class cpu-2core --out runs/reliability
    python -m loadtests.reliability slow-worker    --family DIR ...
    python -m loadtests.reliability full-queue     --family DIR ...
    python -m loadtests.reliability fuzz           --family DIR ... [--gateway URL] [--max-examples 20]
    python -m loadtests.reliability corrupt-member --family DIR ...
    python -m loadtests.reliability all            --family DIR ...

Each scenario is a function returning a result dict ({"scenario", "ok", "checks": {name: bool}, ...});
the CLI writes it to OUT/<scenario>.json and exits non-zero when any check failed.

- kill-worker: SIGKILL the parent's worker under mixed streamed/non-streamed load, start it again on
  the same port. No non-streamed request may be lost (the gateway retries on another worker/member);
  every stream must end with [DONE] (after an error event if its worker died mid-stream); the worker
  must return to rotation and serve again.
- slow-worker: two workers for the parent, one behind a proxy that delays every token; the gateway
  must send most traffic to the fast one (live latency observations).
- full-queue: a worker with one batch slot and one queue slot, flooded; every answer is 200 or 429
  with Retry-After, and a 429 comes fast (not a timeout). Clients honouring Retry-After all finish.
- fuzz: schemathesis against the gateway's OpenAPI schema (bounded examples and time), check
  `not_a_server_error`, plus hand-written malformed requests that must get a 4xx in OpenAI's error
  shape; the gateway must stay up and log no unhandled exception.
- corrupt-member: copy the family, flip one byte of one member's weights; `family verify` must fail
  naming it, `family serve` must refuse it by name at load, and the other members keep serving.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from family.registry import load_family
from loadtests.harness import EmbeddedGateway, ProcessFleet, WorkerConf

SCENARIOS = ("kill-worker", "slow-worker", "full-queue", "fuzz", "corrupt-member")


# --- a small bounded load generator (threads + httpx; no gevent) ---------------------------------------


@dataclass
class Result:
    t: float  # start, seconds since the load began
    stream: bool
    status: int = 0
    e2e_s: float = 0.0
    done: bool = False  # stream ended with [DONE]
    error_event: bool = False  # stream carried an error event
    exception: str | None = None
    member: str | None = None
    worker: str | None = None
    retry_after: str | None = None
    error_type: str | None = None


def one_request(client: httpx.Client, url: str, body: dict, t0: float, timeout: float = 120.0) -> Result:
    res = Result(t=time.perf_counter() - t0, stream=bool(body.get("stream")))
    start = time.perf_counter()
    try:
        with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
            res.status = r.status_code
            res.member, res.worker = r.headers.get("x-family-member"), r.headers.get("x-family-worker")
            res.retry_after = r.headers.get("retry-after")
            if r.status_code != 200:
                try:
                    res.error_type = json.loads(r.read())["error"]["type"]
                except (ValueError, KeyError, TypeError):
                    res.error_type = "unparsable"
            elif res.stream:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        res.done = True
                    elif line.startswith("data:") and '"error"' in line:
                        res.error_event = True
            else:
                json.loads(r.read())["choices"][0]["text"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        res.exception = f"{type(exc).__name__}: {exc}"[:200]
    res.e2e_s = time.perf_counter() - start
    return res


class Load:
    """`threads` callers, each sending requests back to back (alternating streamed and not), until
    stop() or `max_s` seconds or `max_requests` each. Bounded in count and in time."""

    def __init__(self, url: str, body: dict, threads: int = 4, max_s: float = 60, max_requests: int = 200,
                 stream_every: int = 2, timeout: float = 120.0):
        self.url, self.body, self.threads, self.max_s, self.max_requests = url, body, threads, max_s, max_requests
        self.stream_every, self.timeout = stream_every, timeout
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.t0 = 0.0

    def _run(self, k: int) -> None:
        deadline = self.t0 + self.max_s
        with httpx.Client() as client:
            for i in range(self.max_requests):
                if self._stop.is_set() or time.perf_counter() > deadline:
                    return
                body = {**self.body, "stream": (i + k) % self.stream_every == 0}
                r = one_request(client, self.url, body, self.t0, self.timeout)
                with self._lock:
                    self.results.append(r)

    def start(self) -> "Load":
        self.t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.threads)]
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float | None = None) -> list[Result]:
        """Wait until every caller is done (its count or `max_s` reached), at most max_s + `timeout`."""
        deadline = self.t0 + self.max_s + (150 if timeout is None else timeout)
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.perf_counter()))
        return self.results

    def stop(self, join_s: float = 150) -> list[Result]:
        """Stop starting requests; wait for the ones in flight."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=join_s)
        return self.results


def _names(family_dir: Path) -> tuple[str, str, list[str]]:
    """(family name, parent member, other servable members smallest first)."""
    fam = load_family(family_dir)
    others = sorted((m for m in fam.servable if not m.is_parent), key=lambda m: m.parameters)
    return fam.registry.name, fam.registry.parent, [m.name for m in others]


def _finish(name: str, checks: dict, **details) -> dict:
    return {"scenario": name, "ok": all(checks.values()), "checks": checks, **details}


def _summary(results: list[Result]) -> dict:
    from collections import Counter

    return {
        "requests": len(results),
        "non_streamed": sum(not r.stream for r in results),
        "streamed": sum(r.stream for r in results),
        "status": dict(Counter(str(r.status) for r in results)),
        "served_by": dict(Counter(r.member or "-" for r in results)),
        "exceptions": [r.exception for r in results if r.exception][:5],
    }


# --- kill a worker under load ------------------------------------------------------------------------


def kill_worker(family_dir: Path, device_class: str, out: Path, *, fleet: ProcessFleet | None = None, load_s: float = 24,
                kill_at: float = 5, down_s: float = 4, threads: int = 4, max_tokens: int = 24,
                recover_timeout: float = 150) -> dict:
    family_dir = Path(family_dir)
    fname, parent, others = _names(family_dir)
    own = fleet is None
    if own:
        fleet = ProcessFleet(family_dir, [WorkerConf(parent), *[WorkerConf(m) for m in others]], device_class, out / "kill-worker-logs",
                             health_interval=1.0).start()
    try:
        idx = next(i for i, w in enumerate(fleet.procs) if w.conf.member == parent)
        body = {"model": fname, "prompt": "The history of the city", "max_tokens": max_tokens, "ignore_eos": True}
        load = Load(fleet.url, body, threads=threads, max_s=load_s).start()
        time.sleep(kill_at)
        t_kill = time.perf_counter() - load.t0
        fleet.kill_worker(idx)
        time.sleep(down_s)
        t_back = time.perf_counter() - load.t0
        fleet.restart_worker(idx, wait=False)
        results = load.stop()
        # Back in rotation: the gateway marks it healthy again, and it serves requests.
        deadline, t_rotation = time.monotonic() + recover_timeout, None
        t_restart_wall = time.perf_counter()
        while time.monotonic() < deadline:
            st = fleet.worker_state(idx)
            if st and st["healthy"] and not st["in_cooldown"]:
                t_rotation = time.perf_counter() - t_restart_wall
                break
            time.sleep(0.5)
        after = []
        if t_rotation is not None:
            with httpx.Client() as c:
                after = [one_request(c, fleet.url, {**body, "stream": s}, load.t0) for s in (False, True)]
                after += [one_request(c, fleet.url, {**body, "model": parent, "stream": False}, load.t0)]
        ns = [r for r in results if not r.stream]
        st = [r for r in results if r.stream]
        during = [r for r in results if t_kill <= r.t <= t_back + 2]
        checks = {
            "load_ran": len(results) >= threads,
            "no_non_streamed_lost": all(r.status == 200 and r.exception is None for r in ns),
            "streams_end_cleanly": all(r.exception is None and (r.status != 200 or r.done) for r in st),
            "streams_not_rejected": all(r.status == 200 for r in st),
            "other_members_served_during_outage": any(r.member and r.member != parent and r.status == 200 for r in during),
            "worker_back_in_rotation": t_rotation is not None,
            "worker_serves_again": bool(after) and all(r.status == 200 and (not r.stream or r.done) for r in after)
            and any(r.member == parent for r in after),
        }
        return _finish("kill-worker", checks, killed=parent, t_kill_s=round(t_kill, 1), t_restart_s=round(t_back, 1),
                       back_in_rotation_after_restart_s=t_rotation and round(t_rotation, 1),
                       streams_with_error_event=sum(r.error_event for r in st), load=_summary(results),
                       after=[asdict(r) for r in after])
    finally:
        if own:
            fleet.stop()


# --- a slow worker ------------------------------------------------------------------------------------


def slow_worker(family_dir: Path, device_class: str, out: Path, *, fleet: ProcessFleet | None = None, requests_n: int = 40,
                threads: int = 3, delay_s: float = 0.6, per_chunk_s: float = 0.15, max_tokens: int = 16,
                max_slow_share: float = 0.35, max_s: float = 120) -> dict:
    """Parent served by two workers, the first behind a slow proxy. Routed requests, no budget."""
    family_dir = Path(family_dir)
    fname, parent, _ = _names(family_dir)
    own = fleet is None
    if own:
        fleet = ProcessFleet(family_dir, [WorkerConf(parent, slow={"delay_s": delay_s, "per_chunk_s": per_chunk_s}), WorkerConf(parent)],
                             device_class, out / "slow-worker-logs", health_interval=1.0).start()
    try:
        slow = next(w for w in fleet.procs if w.conf.member == parent and w.conf.slow)
        fast = next(w for w in fleet.procs if w.conf.member == parent and not w.conf.slow)
        body = {"model": fname, "prompt": "A short history of the river", "max_tokens": max_tokens, "ignore_eos": True}
        per_thread = max(1, requests_n // threads)
        results = Load(fleet.url, body, threads=threads, max_s=max_s, max_requests=per_thread).start().join()
        results.sort(key=lambda r: r.t)
        warm = results[threads:]  # the first round has no observations to go by
        on_slow = [r for r in warm if r.worker == slow.url]
        on_fast = [r for r in warm if r.worker == fast.url]
        share = len(on_slow) / max(1, len(warm))
        state = {w["url"]: w for w in httpx.get(f"{fleet.url}/v1/family", timeout=10).json()["workers"]}

        def med(rs):
            v = sorted(r.e2e_s for r in rs)
            return round(v[len(v) // 2], 3) if v else None

        checks = {
            "all_served": all(r.status == 200 and r.exception is None and (not r.stream or r.done) for r in results),
            "routes_around_slow_worker": share <= max_slow_share and len(on_fast) > len(on_slow),
            "slow_worker_observed_slower": state[slow.url]["tpot_ratio"] > state[fast.url]["tpot_ratio"],
        }
        return _finish("slow-worker", checks, slow_share_after_first_round=round(share, 3), on_slow=len(on_slow), on_fast=len(on_fast),
                       median_e2e_s={"slow": med(on_slow), "fast": med(on_fast)},
                       ratios={"slow": {k: state[slow.url][k] for k in ("ttft_ratio", "tpot_ratio")},
                               "fast": {k: state[fast.url][k] for k in ("ttft_ratio", "tpot_ratio")}},
                       load=_summary(results))
    finally:
        if own:
            fleet.stop()


# --- a full queue -------------------------------------------------------------------------------------


def full_queue(family_dir: Path, device_class: str, out: Path, *, fleet: ProcessFleet | None = None, member: str | None = None,
               burst: int = 12, max_tokens: int = 48, fast_429_s: float = 5.0, retry_rounds: int = 500, max_s: float = 150) -> dict:
    """A member whose only worker has one batch slot and one queue slot; a burst of pinned requests."""
    family_dir = Path(family_dir)
    _, _, others = _names(family_dir)
    member = member or others[0]
    own = fleet is None
    if own:
        fleet = ProcessFleet(family_dir, [WorkerConf(member, max_batch=1, max_waiting=1)], device_class, out / "full-queue-logs",
                             health_interval=1.0).start()
    try:
        body = {"model": member, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True}
        t0 = time.perf_counter()
        first: list[Result] = [None] * burst  # type: ignore[list-item]
        final: list[Result | None] = [None] * burst
        tries = [0] * burst

        def caller(k: int) -> None:
            deadline = t0 + max_s
            with httpx.Client() as c:
                for attempt in range(retry_rounds):
                    r = one_request(c, fleet.url, {**body, "stream": k % 3 == 0}, t0)
                    if attempt == 0:
                        first[k] = r
                    tries[k] = attempt + 1
                    final[k] = r
                    if r.status != 429 or time.perf_counter() > deadline:
                        return
                    time.sleep(float(r.retry_after or 1))

        threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(burst)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max_s + 60)
        rejected = [r for r in first if r is not None and r.status == 429]
        checks = {
            "only_200_or_429": all(r is not None and r.status in (200, 429) and r.exception is None for r in first),
            "queue_overflowed": len(rejected) > 0,
            "429_has_retry_after": all(r.retry_after and r.retry_after.isdigit() for r in rejected),
            "429_is_rate_limit_error": all(r.error_type == "rate_limit_error" for r in rejected),
            "429_is_fast": all(r.e2e_s < fast_429_s for r in rejected),
            "all_served_after_retry_after": all(r is not None and r.status == 200 and (not r.stream or r.done) for r in final),
        }
        return _finish("full-queue", checks, member=member, burst=burst, first_round_429=len(rejected),
                       max_429_latency_s=round(max((r.e2e_s for r in rejected), default=0), 3), attempts=tries,
                       elapsed_s=round(time.perf_counter() - t0, 1))
    finally:
        if own:
            fleet.stop()


# --- fuzzing the OpenAPI schema -----------------------------------------------------------------------

BAD_INPUTS = [
    ("not json", "POST", "/v1/chat/completions", b"{not json", {"content-type": "application/json"}),
    ("json array", "POST", "/v1/completions", b"[1, 2]", {"content-type": "application/json"}),
    ("empty body", "POST", "/v1/chat/completions", b"", {"content-type": "application/json"}),
    ("no messages", "POST", "/v1/chat/completions", b'{"model": "x"}', {"content-type": "application/json"}),
    ("negative max_tokens", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "max_tokens": -3}', {"content-type": "application/json"}),
    ("huge max_tokens", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "max_tokens": 100000000}', {"content-type": "application/json"}),
    ("unknown model", "POST", "/v1/completions", b'{"model": "gpt-17", "prompt": "hi"}', {"content-type": "application/json"}),
    ("bad budget type", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "budget": {"max_memory_gb": "lots"}}', {"content-type": "application/json"}),
    ("unknown budget field", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "budget": {"max_vram": 1}}', {"content-type": "application/json"}),
    ("impossible budget", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "budget": {"max_memory_gb": 0.000001}}', {"content-type": "application/json"}),
    ("bad budget header", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi"}', {"content-type": "application/json", "x-slo-ttft-ms": "soon"}),
    ("n=3", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "n": 3}', {"content-type": "application/json"}),
    ("wrong content in messages", "POST", "/v1/chat/completions", b'{"model": "@F", "messages": [{"role": "wizard", "content": 5}]}', {"content-type": "application/json"}),
    ("deep nesting", "POST", "/v1/completions", b'{"model": "@F", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", {"content-type": "application/json"}),
    ("big prompt", "POST", "/v1/completions", b'{"model": "@F", "prompt": "' + b"word " * 20000 + b'"}', {"content-type": "application/json"}),
    ("form body", "POST", "/v1/completions", b"model=x&prompt=y", {"content-type": "application/x-www-form-urlencoded"}),
    ("GET on POST route", "GET", "/v1/chat/completions", b"", {}),
    ("unknown route", "GET", "/v2/whatever", b"", {}),
]


def bad_inputs(url: str, family: str) -> list[dict]:
    out = []
    with httpx.Client(timeout=60) as c:
        for name, method, path, body, headers in BAD_INPUTS:
            body = body.replace(b"@F", family.encode())
            try:
                r = c.request(method, url + path, content=body, headers=headers)
                try:
                    err = r.json().get("error", {})
                    shaped = isinstance(err, dict) and {"message", "type"} <= set(err)
                except ValueError:
                    shaped = False
                out.append({"case": name, "status": r.status_code, "ok": 400 <= r.status_code < 500 and shaped,
                            "type": err.get("type") if shaped else None})
            except httpx.HTTPError as exc:
                out.append({"case": name, "status": 0, "ok": False, "error": str(exc)[:200]})
    return out


def fuzz(family_dir: Path, device_class: str, out: Path, *, fleet: ProcessFleet | None = None, gateway: str | None = None,
         max_examples: int = 15, max_time_s: int = 90, request_timeout_s: float = 60, seed: int = 0) -> dict:
    family_dir = Path(family_dir)
    fname, parent, others = _names(family_dir)
    own = fleet is None and gateway is None
    if own:
        fleet = ProcessFleet(family_dir, [WorkerConf(parent), *[WorkerConf(m) for m in others]], device_class, out / "fuzz-logs",
                             health_interval=1.0).start()
    url = gateway or fleet.url
    try:
        out.mkdir(parents=True, exist_ok=True)
        st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis", path=str(Path(sys.executable).parent))
        cmd = [st or "st", "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", str(max_examples),
               "--workers", "1", "--seed", str(seed), "--max-time", str(max_time_s), "--request-timeout", str(request_timeout_s),
               "--phases", "examples,coverage,fuzzing", "--suppress-health-check", "all", "--no-color",
               "--report", "junit", "--report-junit-path", str(out / "fuzz-junit.xml")]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time_s + 240, cwd=out)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, text = 124, f"schemathesis ran past its bound: {exc}"
        (out / "fuzz-schemathesis.log").write_text(text)
        manual = bad_inputs(url, fname)
        alive = httpx.get(f"{url}/health", timeout=10).status_code == 200
        ok_after = httpx.post(f"{url}/v1/completions", json={"model": fname, "prompt": "Hello", "max_tokens": 4}, timeout=120).status_code == 200
        log = (fleet.log_dir / "gateway.log").read_text(errors="replace") if fleet else ""
        checks = {
            "schemathesis_no_5xx": rc == 0,
            "malformed_requests_get_4xx_error_shape": all(m["ok"] for m in manual),
            "gateway_alive_after": alive and ok_after,
            "no_unhandled_exception_logged": "Traceback" not in log and "unhandled error" not in log,
        }
        tail = "\n".join(text.strip().splitlines()[-25:])
        return _finish("fuzz", checks, schemathesis_exit=rc, schemathesis_s=round(time.perf_counter() - t0, 1),
                       schemathesis_tail=tail, bad_inputs=manual, command=" ".join(cmd))
    finally:
        if own:
            fleet.stop()


# --- a corrupted member -------------------------------------------------------------------------------


def _copy_family(src: Path, dst: Path, victim_path: str) -> None:
    """family.json and the victim member copied; the other members (and an outside parent) linked."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copy2(src / "family.json", dst / "family.json")
    for sub in src.iterdir():
        if not sub.is_dir() or sub.name == "logs":
            continue
        if sub.name == victim_path:
            shutil.copytree(sub, dst / sub.name)
        else:
            os.symlink(sub.resolve(), dst / sub.name)


def flip_byte(path: Path, offset: int | None = None, keep_mtime: bool = False) -> int:
    st = path.stat()
    offset = st.st_size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return offset


def corrupt_member(family_dir: Path, device_class: str, out: Path, *, victim: str | None = None, ready_timeout: float = 600) -> dict:
    family_dir = Path(family_dir).resolve()
    fname, parent, others = _names(family_dir)
    fam = load_family(family_dir, verify="none")
    victim = victim or others[0]
    rec = fam.registry.member(victim)
    if Path(rec.path).is_absolute() or "/" in rec.path:
        raise SystemExit(f"corrupt-member needs a member stored directly inside the family folder; {victim} is at {rec.path}")
    copy = Path(out).resolve() / "corrupt-family"
    _copy_family(family_dir, copy, rec.path)
    weight = copy / rec.path / sorted(rec.files)[0]
    offset = flip_byte(weight)
    py = sys.executable
    verify = subprocess.run([py, "-m", "family.cli", "verify", "--family", str(copy)], capture_output=True, text=True, timeout=600)
    log = Path(out).resolve() / "corrupt-member-gateway.log"
    log.unlink(missing_ok=True)
    served, pinned_victim, models = {}, None, []
    with EmbeddedGateway(copy, log, device_class=device_class, ready_timeout=ready_timeout) as gw:
        with httpx.Client(timeout=180) as c:
            models = [m["id"] for m in c.get(f"{gw.url}/v1/models").json()["data"]]
            problems = c.get(f"{gw.url}/v1/family").json().get("problems", {})
            r = c.post(f"{gw.url}/v1/completions", json={"model": victim, "prompt": "Hello", "max_tokens": 4})
            pinned_victim = {"status": r.status_code, "error": r.json().get("error")}
            for m in [fname, *[n for n in [parent, *others] if n != victim]]:
                r = c.post(f"{gw.url}/v1/completions", json={"model": m, "prompt": "Hello", "max_tokens": 4})
                served[m] = {"status": r.status_code, "member": r.headers.get("x-family-member")}
    text = log.read_text(errors="replace")
    # The same flip with the file's mtime kept (bit rot, a copy with -p): does the fast check see it?
    copy2 = Path(out).resolve() / "corrupt-family-mtime"
    _copy_family(family_dir, copy2, rec.path)
    flip_byte(copy2 / rec.path / sorted(rec.files)[0], keep_mtime=True)
    fast = load_family(copy2, verify="fast").problems.get(victim)
    full = load_family(copy2, verify="full").problems.get(victim)
    shutil.rmtree(copy2, ignore_errors=True)
    checks = {
        "verify_fails_naming_member": verify.returncode != 0 and victim in (verify.stdout + verify.stderr),
        "serve_refuses_member_by_name_in_log": f"refusing member {victim}" in text,
        "member_not_listed": victim not in models,
        "member_in_problems": victim in problems,
        "pinned_request_names_member": pinned_victim["status"] >= 400 and victim in json.dumps(pinned_victim["error"]),
        "other_members_serve": all(v["status"] == 200 for v in served.values()),
    }
    result = _finish("corrupt-member", checks, victim=victim, file=str(weight), offset=offset, verify_output=(verify.stdout + verify.stderr)[-800:],
                     refusal_lines=[ln for ln in text.splitlines() if "refusing" in ln], models=models, pinned_victim=pinned_victim, served=served,
                     mtime_preserved_flip={"fast_verify_detects": fast is not None, "full_verify_detects": full is not None})
    shutil.rmtree(copy, ignore_errors=True)
    return result


# --- CLI ----------------------------------------------------------------------------------------------


def run(name: str, args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if name == "kill-worker":
        res = kill_worker(args.family, args.device_class, out)
    elif name == "slow-worker":
        res = slow_worker(args.family, args.device_class, out)
    elif name == "full-queue":
        res = full_queue(args.family, args.device_class, out)
    elif name == "fuzz":
        res = fuzz(args.family, args.device_class, out, gateway=args.gateway, max_examples=args.max_examples, max_time_s=args.max_time)
    elif name == "corrupt-member":
        res = corrupt_member(args.family, args.device_class, out)
    else:
        raise SystemExit(f"unknown scenario {name!r}")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"{name}: {'PASS' if res['ok'] else 'FAIL'} " + ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in res["checks"].items()))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=[*SCENARIOS, "all"])
    ap.add_argument("--family", type=Path, required=True)
    ap.add_argument("--device-class", default="cpu-2core")
    ap.add_argument("--out", type=Path, default=Path("runs/reliability"))
    ap.add_argument("--gateway", default=None, help="fuzz: an already running gateway instead of starting one")
    ap.add_argument("--max-examples", type=int, default=15)
    ap.add_argument("--max-time", type=int, default=90)
    args = ap.parse_args(argv)
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    results = [run(n, args) for n in names]
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
