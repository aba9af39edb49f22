"""How the comparison judges policies (fast: no servers)."""

from __future__ import annotations

from loadtests.budgets import ClassSpec, goodput_at_mix, verdict

CLASSES = [ClassSpec("tight_latency", {}, 3, 1.0, 1.0, (20, 80), (16, 32)), ClassSpec("none", {}, 1, 0.5, 0.5, (20, 80), (16, 32))]


def _result(**by_class: tuple[int, float]) -> dict:
    return {"by_class": {c: {"requests": n, "goodput": g} for c, (n, g) in by_class.items()}, "overall": {"failed": 0}}


def test_goodput_at_mix_weighs_classes_as_the_scenario_does_not_as_requests_fell():
    # Same per-class goodput, different request counts (a policy that rejects fast sends more): same score.
    fast_rejecter = _result(tight_latency=(90, 0.5), none=(10, 1.0))
    slow_server = _result(tight_latency=(10, 0.5), none=(30, 1.0))
    assert goodput_at_mix(fast_rejecter, CLASSES) == goodput_at_mix(slow_server, CLASSES) == (3 * 0.5 + 1 * 1.0) / 4


def test_goodput_at_mix_leaves_out_classes_without_requests():
    assert goodput_at_mix(_result(none=(5, 0.8)), CLASSES) == 0.8
    assert goodput_at_mix(_result(), CLASSES) is None


def test_verdict_reads_the_class_mix_goodput():
    results = {name: {"overall": {"goodput_mix": g, "failed": 0}} for name, g in (("gateway", 0.96), ("parent", 0.4), ("static", 0.7))}
    v = verdict(results)
    assert v["gateway_beats_parent"] and v["gateway_beats_static"] and v["gateway_at_least_95pct"] and v["parent_below_half"]
    results["static"]["overall"]["goodput_mix"] = 0.97
    assert not verdict(results)["gateway_beats_static"]
