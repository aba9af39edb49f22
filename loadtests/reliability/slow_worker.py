"""slow-worker: two workers for the parent, one behind a proxy that delays every token; the gateway
must send most traffic to the fast one (live latency observations).
"""

from __future__ import annotations

from pathlib import Path

import httpx

from loadtests.harness import ProcessFleet, WorkerConf
from loadtests.reliability.common import Load, finish, names, summary

def slow_worker(family_dir: Path, device_class: str, out: Path, *, fleet: ProcessFleet | None = None, requests_n: int = 40,
                threads: int = 3, delay_s: float = 0.6, per_chunk_s: float = 0.15, max_tokens: int = 16,
                max_slow_share: float = 0.35, max_s: float = 120) -> dict:
    """Parent served by two workers, the first behind a slow proxy. Routed requests, no budget."""
    family_dir = Path(family_dir)
    fname, parent, _ = names(family_dir)
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
        return finish("slow-worker", checks, slow_share_after_first_round=round(share, 3), on_slow=len(on_slow), on_fast=len(on_fast),
                       median_e2e_s={"slow": med(on_slow), "fast": med(on_fast)},
                       ratios={"slow": {k: state[slow.url][k] for k in ("ttft_ratio", "tpot_ratio")},
                               "fast": {k: state[fast.url][k] for k in ("ttft_ratio", "tpot_ratio")}},
                       load=summary(results))
    finally:
        if own:
            fleet.stop()
