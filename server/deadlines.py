"""First-token deadlines: a streamed attempt that shows no token in time is cancelled and the request
goes to the next choice, before any byte has reached the client.

Why: a worker can stall (a wedged engine, a GPU hang, a saturated host) while its /health still
answers, and a stream that never starts is the failure callers of LLM routers complain about most.
Until the first token nothing has been sent, so the gateway can still move the request elsewhere.

The deadline of one attempt, counted from when it is sent:

- the budget's `max_ttft_ms`: past it the attempt has missed the budget;
- else its `max_latency_ms` less the predicted decode time (TTFT is what is left for the first token);
- else the gateway's default (`--first-token-timeout`, DEFAULT_S).

A budget-derived deadline applies only while another choice remains: on the last choice a late first
token beats none, so it gets the default (which still bounds a stall). A cancelled attempt is fed to
the worker's observed TTFT ratio (it took at least the deadline), which steers routing away from a
staller without cooling it down: a deadline can come from a client's own tight budget, and a client's
input never takes a worker out of rotation.

Non-streamed requests are not cut by this deadline: their first token is invisible until the whole
answer arrives; they are bounded by the gateway's upstream read timeout.
"""

from __future__ import annotations

from family.latency import LatencyPrediction
from server.errors import APIError
from server.protocol import Budget

DEFAULT_S = 30.0
MIN_S = 0.05


def first_token_deadline(budget: Budget, predicted: LatencyPrediction | None, default_s: float, last_choice: bool) -> float:
    """Seconds an attempt may take to its first token."""
    if last_choice:
        return default_s
    if budget.max_ttft_ms is not None:
        return max(MIN_S, budget.max_ttft_ms / 1e3)
    if budget.max_latency_ms is not None:
        decode = (predicted.e2e_s - predicted.ttft_s) if predicted is not None else 0.0
        return max(MIN_S, budget.max_latency_ms / 1e3 - decode)
    return default_s


class FirstTokenTimeout(Exception):
    """No first token by the attempt's deadline."""

    def __init__(self, deadline_s: float):
        super().__init__(f"no first token within {deadline_s * 1e3:.0f} ms")
        self.deadline_s = deadline_s


def no_first_token_error(workers: list[str], deadline_s: float) -> APIError:
    return APIError(504, f"no worker produced a first token in time (last deadline {deadline_s * 1e3:.0f} ms; tried: "
                         f"{', '.join(workers)}); retry shortly", type="server_error", code="first_token_timeout",
                    headers={"Retry-After": "1"})
