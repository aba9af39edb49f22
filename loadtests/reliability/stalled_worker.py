"""stalled-worker: the parent on two workers, one behind a proxy that holds every completion for
`stall_s` before passing it on (its /health stays fast, so health checks never notice), under
streamed load (issue 12). The gateway's default first-token deadline is `deadline_s`.

What must hold:

- every stream is served: HTTP 200, no error event, ends with [DONE]; the client never sees the stall
  (each request ends well before `stall_s`), because an attempt with no first token by its deadline is
  cancelled and the request goes to the next choice before any byte reached the client;
- the gateway counted those cancellations, and learned from them: after the first ones, most traffic
  goes to the healthy worker;
- the stalled worker is never cooled down for it (a deadline can come from a client's own budget).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import httpx

from loadtests.harness import ProcessFleet, WorkerConf
from loadtests.reliability.common import Load, finish, names, summary


def stalled_worker(family_dir: Path, device_class: str, out: Path, *, fleet: ProcessFleet | None = None, stall_s: float = 8.0,
                   deadline_s: float = 1.0, threads: int = 3, max_s: float = 30, max_tokens: int = 16,
                   max_stalled_share: float = 0.3) -> dict:
    family_dir = Path(family_dir)
    fname, parent, _ = names(family_dir)
    own = fleet is None
    if own:
        fleet = ProcessFleet(family_dir, [WorkerConf(parent, slow={"delay_s": stall_s, "per_chunk_s": 0.0}), WorkerConf(parent)],
                             device_class, out / "stalled-worker-logs", health_interval=0.5,
                             gateway_args=["--first-token-timeout", str(deadline_s)]).start()
    try:
        stalled = next(w for w in fleet.procs if w.conf.slow)
        body = {"model": fname, "prompt": "A short history of the river", "max_tokens": max_tokens, "ignore_eos": True}
        results = Load(fleet.url, body, threads=threads, max_s=max_s, max_requests=10_000, stream_every=1, timeout=60).start().join()
        results.sort(key=lambda r: r.t)
        metrics = httpx.get(f"{fleet.url}/metrics", timeout=10).text
        cancels = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("family_first_token_deadline_cancels_total"))
        state = next(w for w in httpx.get(f"{fleet.url}/v1/family", timeout=10).json()["workers"] if w["url"].rstrip("/") == stalled.url)
        served = [r for r in results if r.status == 200 and r.exception is None and r.done and not r.error_event]
        warm = results[threads * 2:]  # after the first rounds, which meet the staller before anything is known of it
        on_stalled = sum(r.worker == stalled.url for r in warm)
        e2e = sorted(r.e2e_s for r in results)
        checks = {
            "every_stream_served_cleanly": len(served) == len(results) > 0,
            "no_request_waited_out_the_stall": bool(e2e) and e2e[-1] < stall_s,
            "deadline_cancellations_counted": cancels >= 1,
            "traffic_moves_off_the_staller": cancels <= max(threads * 2, max_stalled_share * len(results)),
            "stalled_worker_not_cooled_down": state["cooldowns"] == 0 and state["healthy"],
        }
        return finish("stalled-worker", checks, stall_s=stall_s, deadline_s=deadline_s, cancellations=cancels,
                      served_by_stalled_after_warmup=on_stalled, ttft_ratio_of_stalled=state["ttft_ratio"],
                      e2e_ms={"p50": round(statistics.median(e2e) * 1e3, 1) if e2e else None,
                              "max": round(e2e[-1] * 1e3, 1) if e2e else None},
                      load=summary(results))
    finally:
        if own:
            fleet.stop()
