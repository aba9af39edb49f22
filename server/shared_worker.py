"""Members that share one worker process take turns on its cores.

One torch worker per CPU host serves several members (server/engine_torch.py): each scheduler round
runs one forward pass per member that has work, so a member's step takes its own time *plus* one
step of every other busy member on that worker. The registry's latency model was measured with the
member alone (`family profile`), so on a shared worker it is optimistic exactly when it matters: when
a sibling is busy. Routing a request to an idle p90 next to a busy parent then looks fast, and costs
both of them a turn each round (README, "Load tests and goodput").

`siblings_step_s` is what the router adds to a member's predicted time per token and time to first
token on such a worker: the registry's time per token of each busy sibling at its current load. The
worker's observed/predicted ratios are then learnt against that sum, so they correct what is left.
Workers that serve one member (vLLM, one GPU each) have no siblings and nothing changes for them.
"""

from __future__ import annotations

from family.latency import predict_latency
from family.registry import Family
from server.pool import Pool, WorkerState


def siblings_step_s(family: Family, pool: Pool, w: WorkerState, prompt_tokens: int, max_tokens: int, first: bool = False) -> float:
    """Seconds that the other busy members of `w`'s worker add to each of its steps. `first`: for a
    request served deadline first (server.deadline_scheduling), whose rounds hold only the members
    with such requests, at their count of them."""
    total = 0.0
    for s in pool.siblings(w):
        load = s.first_in_flight if first else s.load()
        if load <= 0:
            continue
        pred = predict_latency(family.registry.member(s.spec.member), s.spec.device_class, prompt_tokens, max_tokens, load,
                               family.registry.devices)
        total += pred.tpot_s if pred is not None else 0.0
    return total
