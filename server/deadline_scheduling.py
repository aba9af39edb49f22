"""Deadline-first scheduling in the torch engine: requests with a latency budget go first.

Why: one torch worker serves every member of a CPU host, one step per busy member per round, and a new
request's prompt is prefilled before the next step. So a request with a tight latency budget waits,
for every token, behind one step of each other busy member and behind the prefill of every prompt
that arrived meanwhile: at 12 users on 2 cores that doubled its time per token, and the gateway shed
nearly all such requests (docs/results/loadtests.md). Requests with no latency budget can wait a
little; requests with one cannot.

Two sides, one module: what the gateway sends (`with_deadline`) and what the engine does with it
(`steps`, `pressing_first`, `admit_order`, `admissible`). On a worker that schedules this way (its
fleet entry says `deadline_scheduling`; local torch workers do) the router predicts such a request
behind the other such requests in flight there only, scaled by the ratios it learns from those
requests alone (server.router).

The gateway says how long a request may take (`x-family-deadline-ms`, what is left of the budget's
`max_latency_ms`, else of its `max_ttft_ms`); the worker turns it into a deadline. A request is
*pressing* when, at the pace of a full round (one step of every member with work, as the engine last
measured them), its remaining tokens would not make the deadline. Each round:

- while any member holds a pressing request (running or waiting), members holding none are not
  stepped, and prompts that are not pressing are not prefilled into a batch with pressing rows:
  neither delays the pressing rows' tokens;
- but no request waits for that more than `max_defer_s` (its member is stepped, its prompt prefilled,
  once it has waited that long since its last token or its arrival), so other work slows down, it
  never stops;
- within a member, a step decodes only its pressing rows (moved to the front of its batch), unless
  one of the others has waited `max_defer_s`;
- waiting requests are admitted earliest deadline first, then in arrival order.

A deadline far enough away is not pressing (a loose budget does not hold anyone back), and with
nothing pressing this is the engine's plain round-robin. Pure functions over what the engine knows,
so the policy is tested without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


HEADER = "x-family-deadline-ms"
MAX_DEFER_S = 0.25  # the longest a request without a deadline is held back, per token or before its prefill


class Work(Protocol):
    deadline: float | None  # perf_counter time by which the caller's budget runs out; None: no latency budget
    arrived: float
    last_token_at: float  # 0.0 before the first token
    max_tokens: int
    output_ids: list[int]


def parse_deadline_ms(value: str | None) -> float | None:
    """Seconds the request may take, from the header; None when absent or not a number ≥ 0 (a malformed
    hint is ignored: it schedules, it never refuses a request)."""
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        return None
    return ms / 1e3 if ms >= 0 and ms == ms and ms != float("inf") else None


def with_deadline(headers: dict[str, str], max_latency_ms: float | None, max_ttft_ms: float | None, elapsed_s: float) -> dict[str, str]:
    """The gateway's side: `headers` plus what is left of the caller's latency budget (the whole answer's,
    else the first token's) after `elapsed_s` in the gateway; unchanged without a latency limit."""
    limit = max_latency_ms if max_latency_ms is not None else max_ttft_ms
    if limit is None:
        return headers
    return {**headers, HEADER: f"{max(0.0, limit - elapsed_s * 1e3):.0f}"}


def pressing(r: Work, now: float, pace_s: float) -> bool:
    """Whether `r` has a deadline that its remaining tokens would miss at `pace_s` seconds a token (the
    time of a round in which every member with work takes its step). A pressing row that catches up
    stops being pressing and shares the round again: it finishes in time, not early, and the others
    lose no more turns than that takes."""
    return r.deadline is not None and r.deadline - now < (r.max_tokens - len(r.output_ids)) * pace_s


def any_pressing(rows: Sequence[Work], waiting: Sequence[Work], now: float, pace_s: float) -> bool:
    return any(pressing(r, now, pace_s) for r in [*rows, *waiting])


def overdue(r: Work, now: float, max_defer_s: float = MAX_DEFER_S) -> bool:
    """A request without a deadline that has been held back long enough: since its last token, or since
    it arrived when it has none yet."""
    return now - (r.last_token_at or r.arrived) >= max_defer_s


def steps(rows: Sequence[Work], waiting: Sequence[Work], urgent: bool, now: float, pace_s: float,
          max_defer_s: float = MAX_DEFER_S) -> bool:
    """Whether a member takes its step this round. `urgent`: some member holds a pressing request."""
    if not rows and not waiting:
        return False
    if not urgent or any_pressing(rows, waiting, now, pace_s):
        return True
    return any(overdue(r, now, max_defer_s) for r in [*rows, *waiting])


def pressing_first(rows: Sequence[Work], now: float, pace_s: float, max_defer_s: float = MAX_DEFER_S) -> int:
    """How many rows this step decodes: all of them, or, when some are pressing and none of the others
    has waited `max_defer_s`, only the pressing ones (a smaller batch steps faster). The engine puts those
    first (`partition`)."""
    hot = sum(pressing(r, now, pace_s) for r in rows)
    if hot == 0 or hot == len(rows) or any(not pressing(r, now, pace_s) and overdue(r, now, max_defer_s) for r in rows):
        return len(rows)
    return hot


def partition(rows: list[Work], now: float, pace_s: float) -> list[tuple[int, int]]:
    """The swaps (i, j) that bring the pressing rows to the front, in order; applied to `rows` too."""
    swaps, front = [], 0
    for i in range(len(rows)):
        if pressing(rows[i], now, pace_s):
            if i != front:
                rows[front], rows[i] = rows[i], rows[front]
                swaps.append((front, i))
            front += 1
    return swaps


def admit_order(waiting: Sequence[Work]) -> list[Work]:
    """Earliest deadline first, then requests without one, each in arrival order."""
    return sorted(waiting, key=lambda r: (r.deadline is None, r.deadline or 0.0, r.arrived))


def admissible(r: Work, rows_pressing: bool, now: float, pace_s: float, max_defer_s: float = MAX_DEFER_S) -> bool:
    """Whether a waiting request may be prefilled now: a pressing one always; another only when no row
    of its member is pressing (its prefill would delay their next token), or once it has waited
    `max_defer_s`."""
    return pressing(r, now, pace_s) or not rows_pressing or overdue(r, now, max_defer_s)
