"""full-queue: a worker with one batch slot and one queue slot, flooded; every answer is 200 or 429
with Retry-After, and a 429 comes fast (not a timeout). Clients honouring Retry-After all finish.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from loadtests.harness import ProcessFleet, WorkerConf
from loadtests.reliability.common import Result, finish, names, one_request

def full_queue(family_dir: Path, device_class: str, out: Path, *, fleet: ProcessFleet | None = None, member: str | None = None,
               burst: int = 12, max_tokens: int = 48, fast_429_s: float = 5.0, retry_rounds: int = 500, max_s: float = 150) -> dict:
    """A member whose only worker has one batch slot and one queue slot; a burst of pinned requests."""
    family_dir = Path(family_dir)
    _, _, others = names(family_dir)
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
        return finish("full-queue", checks, member=member, burst=burst, first_round_429=len(rejected),
                       max_429_latency_s=round(max((r.e2e_s for r in rejected), default=0), 3), attempts=tries,
                       elapsed_s=round(time.perf_counter() - t0, 1))
    finally:
        if own:
            fleet.stop()
