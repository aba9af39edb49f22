"""What a key may use: its allowed members and its budget ceiling, applied to one request.

A key's `budget` is a default that the request may override; its `members` and `cap` are limits the
request cannot get past (issue 13: an operator must be able to stop a key from asking for the parent,
or from setting no latency limit):

- a request pinned to a member outside `members` is refused with 403; a routed one is routed among
  `members` only;
- each limit of `cap` replaces the request's own when the request's is looser or missing (narrowed,
  not refused); best effort, which serves past a budget, never serves past the cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from family.registry import Family
from server.errors import APIError
from server.keys import KeyCap, KeySpec
from server.protocol import Budget
from server.router import Choice

_LIMITS = ("max_memory_gb", "max_ttft_ms", "max_latency_ms")


@dataclass(frozen=True)
class Grant:
    """What one request may use."""

    members: frozenset[str] | None = None  # None: every member
    cap: KeyCap | None = None

    def narrow(self, budget: Budget) -> Budget:
        """`budget` with every limit no looser than the cap's."""
        if self.cap is None:
            return budget
        tighter = {}
        for name in _LIMITS:
            ceiling, asked = getattr(self.cap, name), getattr(budget, name)
            if ceiling is not None and (asked is None or asked > ceiling):
                tighter[name] = ceiling
        return budget.model_copy(update=tighter) if tighter else budget

    def within(self, choice: Choice) -> bool:
        """Whether a choice (best effort included) stays inside the cap and the member list."""
        if self.members is not None and choice.member.name not in self.members:
            return False
        cap = self.cap
        if cap is None:
            return True
        if cap.max_memory_gb is not None and choice.member.memory_bytes(choice.worker.spec.device_class) / 1e9 > cap.max_memory_gb:
            return False
        if cap.max_ttft_ms is None and cap.max_latency_ms is None:
            return True
        pred = choice.predicted
        if pred is None:  # no latency model on this device class: it cannot be shown to fit
            return False
        return ((cap.max_ttft_ms is None or pred.ttft_s * 1e3 <= cap.max_ttft_ms)
                and (cap.max_latency_ms is None or pred.e2e_s * 1e3 <= cap.max_latency_ms))


OPEN = Grant()


def grant_for(key: KeySpec | None, family: Family, pinned: str | None) -> Grant:
    """The key's grant; 403 when the request pins a member the key may not use."""
    if key is None or (key.members is None and key.cap is None):
        return OPEN
    members = frozenset(key.members) if key.members is not None else None
    if pinned is not None and members is not None and pinned not in members:
        raise APIError(403, f"key {key.name!r} may not use member {pinned!r}; it may use: {', '.join(sorted(members))}"
                            f" (or {family.registry.name!r}, routed among them)",
                       type="permission_error", param="model", code="model_not_allowed")
    return Grant(members, key.cap)
