"""kill-worker: SIGKILL the parent's worker under mixed streamed/non-streamed load, start it again on
the same port. No non-streamed request may be lost (the gateway retries on another worker/member);
every stream must end with [DONE] (after an error event if its worker died mid-stream); the worker
must return to rotation and serve again.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import httpx

from loadtests.harness import ProcessFleet, WorkerConf
from loadtests.reliability.common import Load, finish, names, one_request, summary

def kill_worker(family_dir: Path, device_class: str, out: Path, *, fleet: ProcessFleet | None = None, load_s: float = 24,
                kill_at: float = 5, down_s: float = 4, threads: int = 4, max_tokens: int = 24,
                recover_timeout: float = 150) -> dict:
    family_dir = Path(family_dir)
    fname, parent, others = names(family_dir)
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
        return finish("kill-worker", checks, killed=parent, t_kill_s=round(t_kill, 1), t_restart_s=round(t_back, 1),
                       back_in_rotation_after_restart_s=t_rotation and round(t_rotation, 1),
                       streams_with_error_event=sum(r.error_event for r in st), load=summary(results),
                       after=[asdict(r) for r in after])
    finally:
        if own:
            fleet.stop()
