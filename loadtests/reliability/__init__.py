"""Reliability scenarios against a real gateway and real workers, on loopback, each bounded in time.

    python -m loadtests.reliability kill-worker    --family DIR --device-class cpu-2core --out runs/reliability
    python -m loadtests.reliability slow-worker    --family DIR ...
    python -m loadtests.reliability full-queue     --family DIR ...
    python -m loadtests.reliability fuzz           --family DIR ... [--gateway URL] [--max-examples 20]
    python -m loadtests.reliability corrupt-member --family DIR ...
    python -m loadtests.reliability hostile-input  --family DIR ...
    python -m loadtests.reliability redis-down     --family DIR ...
    python -m loadtests.reliability priority-overload --family DIR ...
    python -m loadtests.reliability stalled-worker --family DIR ...
    python -m loadtests.reliability all            --family DIR ...

Each scenario is a function returning a result dict ({"scenario", "ok", "checks": {name: bool}, ...}),
in its own module (what it does and what must hold are in that module's docstring); `common` holds
the load generator they share and `cli` the command line, which writes each result to
OUT/<scenario>.json and exits non-zero when any check failed.
"""

from loadtests.reliability.common import Load, Result, one_request
from loadtests.reliability.corrupt_member import corrupt_member, flip_byte
from loadtests.reliability.full_queue import full_queue
from loadtests.reliability.fuzz import BAD_INPUTS, bad_inputs, fuzz
from loadtests.reliability.hostile_input import hostile_input
from loadtests.reliability.kill_worker import kill_worker
from loadtests.reliability.redis_down import redis_down
from loadtests.reliability.priority_overload import priority_overload
from loadtests.reliability.slow_worker import slow_worker
from loadtests.reliability.stalled_worker import stalled_worker

SCENARIOS = ("kill-worker", "slow-worker", "full-queue", "fuzz", "corrupt-member", "hostile-input", "redis-down", "priority-overload",
             "stalled-worker")

__all__ = ["BAD_INPUTS", "SCENARIOS", "Load", "Result", "bad_inputs", "corrupt_member", "flip_byte", "full_queue", "fuzz",
           "hostile_input", "kill_worker", "one_request", "priority_overload", "redis_down", "slow_worker",
           "stalled_worker"]
