"""How the comparison judges policies (fast: no servers)."""

from __future__ import annotations

from loadtests.budgets import ClassSpec, Figures, derive_classes, goodput_at_mix, verdict
from loadtests.tinyfamily import DEVICE_CLASS

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


def test_budget_classes_come_from_the_members_routed_traffic_can_reach(tiny_family_dir):
    fig = Figures.from_dir(tiny_family_dir, DEVICE_CLASS)
    every = {c.name: c.budget for c in derive_classes(fig)}
    tl = ClassSpec("tight_latency", {}, 3, 1.0, 1.0, (20, 80), (16, 32))
    speed = {m.name: fig.predict(m, tl.approx_prompt_tokens(), tl.max_tokens[1], 2.0).e2e_s for m in fig.registry.members}
    fastest = min(speed, key=speed.get)
    assert fastest != fig.parent
    fig.registry.fitness.min_chat_agreement = fig.member(fastest).quality + 0.01  # the fastest member is now unfit
    fit = {c.name: c.budget for c in derive_classes(fig)}
    # The tight-latency limits follow the fastest *fit* member, so they loosen.
    assert fit["tight_latency"]["max_latency_ms"] > every["tight_latency"]["max_latency_ms"]
    rest = min((n for n in speed if n != fastest), key=speed.get)
    assert fit["tight_latency"]["max_latency_ms"] == float(f"{2.0 * speed[rest] * 1e3:.4g}")


def test_the_report_says_how_far_served_requests_were_from_their_predicted_latency():
    from loadtests.budgets import Outcome
    from loadtests.report import markdown_table, summarize_group

    def out(e2e, predicted, status=200):
        return Outcome("gateway", "none", {}, "fam", True, True, 16, 0.0, status, e2e, predicted_latency_ms=predicted, member="m")

    s = summarize_group([out(100, 100), out(300, 100), out(50, 100), out(80, None), out(900, 100, status=503)], 10.0)
    # Only served requests that carried a prediction: 0.5, 1.0, 3.0.
    assert s["e2e_over_predicted"]["n"] == 3 and s["e2e_over_predicted"]["p50"] == 1.0
    assert "| 1.00/2.60 |" in markdown_table({"gateway": {"overall": s, "by_class": {"none": s}}})
