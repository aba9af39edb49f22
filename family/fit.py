"""Whether a member fits a budget's limits, and by how much it misses: one place for the checks that
both `members_fitting` (the registry's static answer) and the gateway's router (server/router.py, the
same checks with live load on top) make.

A `Verdict` names the limit a member fails and its violation relative to that limit (0.25 = 25% over),
so that a caller who allows best effort gets the member closest to fitting.
"""

from __future__ import annotations

from dataclasses import dataclass

from family import defaults
from family.latency import LatencyPrediction, predict_latency
from family.registry import Family, FamilyRegistry, MemberRecord, rank_key


@dataclass
class Verdict:
    """Why one member does not fit, and by how much (violation ≥ 0, relative to the limit)."""

    member: str
    constraint: str
    detail: str
    violation: float


def static_verdict(m: MemberRecord, device_class: str, devices: dict | None, *, need_tokens: int,
                   max_memory_gb: float | None = None, min_accuracy: float | None = None) -> Verdict | None:
    """The limits that do not depend on load: context (prompt + output ≤ max_model_len), memory (the
    member's own need on `device_class`: weights + KV cache, GB = 1e9 bytes) and accuracy (chat agreement
    at the dtype it is served at on `device_class`; not measured there fails any `min_accuracy`)."""
    if need_tokens > m.max_model_len:
        return Verdict(m.name, "context_length", f"{need_tokens} tokens > max_model_len {m.max_model_len}",
                       need_tokens / m.max_model_len - 1)
    if max_memory_gb is not None:
        gb = m.memory_bytes(device_class, devices=devices) / 1e9
        if gb > max_memory_gb:
            return Verdict(m.name, "max_memory_gb", f"needs {gb:.2f} GB > {max_memory_gb} GB", gb / max_memory_gb - 1)
    if min_accuracy is not None:
        dtype = m.serving_dtype(device_class, devices)
        q = m.quality_at(dtype)
        if q is None:
            how = "family eval" if dtype == "float32" else f"family eval --dtype {dtype}"
            return Verdict(m.name, "min_accuracy", f"accuracy at {dtype}, its dtype on {device_class}, not measured (run {how})", 1.0)
        if q < min_accuracy:
            return Verdict(m.name, "min_accuracy", f"accuracy {q:.3f} < {min_accuracy}", min_accuracy / max(q, 1e-9) - 1)
    return None


def latency_verdict(m: MemberRecord, pred: LatencyPrediction | None, *, max_ttft_ms: float | None = None,
                    max_latency_ms: float | None = None, max_tpot_ms: float | None = None) -> Verdict | None:
    """The latency limits against a prediction (None: no profile, measured or predicted, which fails any limit)."""
    limits = [("max_ttft_ms", max_ttft_ms, "ttft_s"), ("max_latency_ms", max_latency_ms, "e2e_s"), ("max_tpot_ms", max_tpot_ms, "tpot_s")]
    for name, limit, attr in limits:
        if limit is None:
            continue
        if pred is None:
            return Verdict(m.name, name, "no latency profile, measured or predicted, on this device class", 1.0)
        ms = getattr(pred, attr) * 1e3
        if ms > limit:
            return Verdict(m.name, name, f"predicted {ms:.0f} ms > {limit:.0f} ms", ms / limit - 1)
    return None


def members_fitting(
    family: Family | FamilyRegistry,
    *,
    device_class: str,
    max_memory_gb: float | None = None,
    max_ttft_ms: float | None = None,
    max_latency_ms: float | None = None,
    min_accuracy: float | None = None,
    prompt_tokens: int = 128,
    output_tokens: int = defaults.DEFAULT_MAX_TOKENS,
    context_tokens: int | None = None,
    concurrency: int = 1,
    include_unfit: bool = False,
) -> list[MemberRecord]:
    """The members whose registry figures meet every given limit, best first (`rank_key`).

    A static answer: `static_verdict` and `latency_verdict` against the fitted latency model of
    `device_class` at `concurrency` for a request of `prompt_tokens` in and `output_tokens` out
    (predicted from the device's bandwidth where it was never profiled; a member on an unknown device
    fits only when no latency limit is given). The context needed is `context_tokens`, else prompt +
    output. With a `Family`, only servable members (verified files) are considered; members unfit under
    the family's fitness policy are left out unless `include_unfit` (routed traffic never reaches them).
    The gateway adds live load on top of this.
    """
    members = family.servable if isinstance(family, Family) else list(family.members)
    registry = family.registry if isinstance(family, Family) else family
    policy, devices = registry.fitness, registry.devices
    need = context_tokens if context_tokens is not None else prompt_tokens + output_tokens
    fits = []
    for m in members:
        if not include_unfit and m.unfit_reason(policy, m.serving_dtype(device_class, devices)):
            continue
        if static_verdict(m, device_class, devices, need_tokens=need, max_memory_gb=max_memory_gb, min_accuracy=min_accuracy):
            continue
        if max_ttft_ms is not None or max_latency_ms is not None:
            pred = predict_latency(m, device_class, prompt_tokens, output_tokens, concurrency, devices)
            if latency_verdict(m, pred, max_ttft_ms=max_ttft_ms, max_latency_ms=max_latency_ms):
                continue
        fits.append(m)
    return sorted(fits, key=lambda m: rank_key(m, m.serving_dtype(device_class, devices)))
