"""Budget routing on an in-memory registry: which member and which worker, and why not the others.

No HTTP here: the router is a pure function of the registry, the pool's live state and the budget.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from family import defaults
from family.devices import PUBLISHED
from family.latency import predict_latency
from family.registry import AccuracyRecord, DeviceRecord, Family, FamilyRegistry, FitnessPolicy, LatencyProfile, MemberRecord, MemoryBreakdown
from server.fleet import WorkerSpec
from server.metrics import GatewayMetrics
from server.pool import RATIO_HALF_LIFE_S, Pool, Speed
from server.protocol import Budget
from server.router import best_effort, no_fit_error, route

GB = 10**9


def _member(name: str, params: int, quality: float | None, ttft: float | None, tpot: float = 0.01, *, ppl: float = 20.0,
            need_gb: float | None = None, max_len: int = 2048, is_parent: bool = False) -> MemberRecord:
    m = MemberRecord(name=name, path=name, architecture="LlamaForCausalLM", is_parent=is_parent, parameters=params,
                     bytes={"float32": params * 4}, max_model_len=max_len, files={}, kv_values_per_token=2 * 24 * 8 * 128)
    if quality is not None and not is_parent:
        m.accuracy.append(AccuracyRecord(metric="chat_agreement", value=quality, data="test"))
    m.accuracy.append(AccuracyRecord(metric="perplexity", value=ppl, data="test"))
    if ttft is not None:
        coef = {"a0": ttft, "a1": 0.0, "a2": 0.0, "a3": 0.05, "b0": tpot, "b1": 0.0, "b2": 0.0}  # a3: +50 ms per queued request
        # need_gb: the measured need (weights at bf16 + KV cache); the worker's RSS adds a 3 GB runtime that does not count
        memory = MemoryBreakdown(dtype="bfloat16", weights_bytes=params * 2, kv_bytes_per_token=1000, kv_batch=1,
                                 kv_context=int(need_gb * GB) // 1000 - params * 2 // 1000, runtime_bytes=3 * GB,
                                 worker_peak_rss_bytes=int((need_gb + 3) * GB)) if need_gb else None
        m.latency["cpu"] = LatencyProfile(device_class="cpu", engine="torch", latency_model=coef, memory=memory,
                                          peak_memory_bytes=memory.worker_peak_rss_bytes if memory else None)
    return m


@pytest.fixture
def family() -> Family:
    members = [
        _member("f-p100", 1_000_000_000, 1.0, ttft=0.400, tpot=0.040, ppl=20, is_parent=True),  # 4 GB of fp32 weights
        _member("f-p80", 800_000_000, 0.9, ttft=0.150, tpot=0.020, ppl=24, need_gb=2.5),  # measured need overrides bytes
        _member("f-p60", 600_000_000, 0.7, ttft=0.030, tpot=0.005, ppl=35),
        _member("f-p40", 400_000_000, 0.5, ttft=None, ppl=80, max_len=64),  # never profiled, short context
    ]
    return Family(Path("/nonexistent"), FamilyRegistry(name="f", parent="f-p100", members=members), problems={})


def _pool(members_workers: dict[str, int], device_class: str = "cpu") -> Pool:
    specs = [WorkerSpec(url=f"http://127.0.0.1:{9000 + i * 10 + k}", member=m, device_class=device_class)
             for i, (m, n) in enumerate(members_workers.items()) for k in range(n)]
    pool = Pool(specs, None, GatewayMetrics())
    for w in pool.workers:
        w.healthy = True
    return pool


ALL = {"f-p100": 1, "f-p80": 1, "f-p60": 1, "f-p40": 1}


def _best(family, pool, budget: dict, prompt=10, out=8, **kw) -> str | None:
    r = route(family, pool, Budget(**budget), prompt_tokens=prompt, max_tokens=out, **kw)
    return r.choices[0].member.name if r.choices else None


# max_tokens 8: e2e = ttft + 7·tpot → p100 680 ms, p80 290 ms, p60 65 ms; p40 unknown.
@pytest.mark.parametrize("budget, expect", [
    ({}, "f-p100"),
    ({"max_ttft_ms": 400}, "f-p100"),
    ({"max_ttft_ms": 399}, "f-p80"),
    ({"max_latency_ms": 300}, "f-p80"),
    ({"max_latency_ms": 100}, "f-p60"),
    ({"max_latency_ms": 10}, None),
    ({"max_memory_gb": 3.0}, "f-p80"),  # p100 needs 4 GB (weights), p80 2.5 GB (its measured need, not its 5.5 GB worker)
    ({"max_memory_gb": 2.45}, "f-p60"),  # p60: 2.4 GB of weights
    ({"max_memory_gb": 2.0}, "f-p40"),  # p40: 1.6 GB
    ({"max_memory_gb": 1.0}, None),
    ({"min_accuracy": 0.95}, "f-p100"),
    ({"min_accuracy": 0.6, "max_memory_gb": 3.0}, "f-p80"),
    ({"min_accuracy": 0.8, "max_latency_ms": 100}, None),
])
def test_the_most_accurate_member_within_budget(family, budget, expect):
    assert _best(family, _pool(ALL), budget) == expect


def test_an_unprofiled_member_fits_only_budgets_without_latency_limits(family):
    pool = _pool({"f-p40": 1})
    assert _best(family, pool, {}) == "f-p40"
    result = route(family, pool, Budget(max_ttft_ms=10_000), prompt_tokens=10, max_tokens=8)
    (verdict,) = [v for v in result.refused if v.member == "f-p40"]
    assert not result.choices and verdict.constraint == "max_ttft_ms" and "no latency profile" in verdict.detail
    # ... unless the caller allows best effort.
    assert best_effort(family, pool, result, prompt_tokens=10, max_tokens=8)[0].member.name == "f-p40"


# --- device classes never profiled: predicted from bandwidth and bytes (issue 11) -------------------


def test_an_h100_worker_is_routed_on_predictions_before_anyone_profiled_it(family):
    """The fleet lists h100 workers; every member was profiled on cpu only. Latency budgets still route,
    on the predicted law, the smaller member predicted faster; the worker's observations correct it."""
    pool = _pool({"f-p100": 1, "f-p60": 1}, device_class="h100")
    r = route(family, pool, Budget(max_latency_ms=60_000), prompt_tokens=10, max_tokens=8)
    assert [c.member.name for c in r.choices] == ["f-p100", "f-p60"]
    for c in r.choices:
        assert c.predicted == predict_latency(c.member, "h100", 10, 8, 1)
        assert c.member.profile("h100").basis == "predicted"
    p100, p60 = (c.predicted for c in r.choices)
    assert p60.tpot_s < p100.tpot_s and p100.e2e_s < 0.1  # bf16 bytes at half of 3.35 TB/s: milliseconds
    # a budget between the two predictions picks the member predicted within it
    assert _best(family, pool, {"max_latency_ms": 1e3 * (p100.e2e_s + p60.e2e_s) / 2}) == "f-p60"
    # memory there: the predicted need (bf16 weights + KV at the default batch and context)
    need = family.registry.member("f-p100").memory_bytes("h100")
    assert need == 2 * 1_000_000_000 + 2 * (2 * 24 * 8 * 128) * defaults.SERVING_BATCH * defaults.KV_CONTEXT
    assert _best(family, pool, {"max_memory_gb": need / GB - 0.01}) == "f-p60"
    # observed 4x slower than predicted: corrected, as for measured profiles
    (w,) = pool.for_member("f-p60")
    for _ in range(10):
        w.observe(p60.ttft_s, 4 * p60.ttft_s, p60.tpot_s, 4 * p60.tpot_s)  # predicted, observed
    again = route(family, pool, Budget(), prompt_tokens=10, max_tokens=8, pinned="f-p60").choices[0].predicted
    assert again.tpot_s == pytest.approx(4 * p60.tpot_s, rel=0.1)


def test_a_measured_device_record_predicts_for_a_class_with_no_datasheet(family):
    pool = _pool({"f-p60": 1}, device_class="cpu-big")
    assert not route(family, pool, Budget(max_latency_ms=10_000), prompt_tokens=10, max_tokens=8).choices
    family.registry.devices["cpu-big"] = DeviceRecord(device_class="cpu-big", bandwidth_bytes_s=100e9, matmul_flops=1e12)
    (choice,) = route(family, pool, Budget(max_latency_ms=10_000), prompt_tokens=10, max_tokens=8).choices
    weights = 4 * 600_000_000  # fp32: the measured record's dtype
    assert choice.predicted.tpot_s == pytest.approx(weights / (100e9 * defaults.PREDICTED_BANDWIDTH_EFFICIENCY)
                                                   + (10 + 8 / 2) * 4 * 2 * 24 * 8 * 128 / (100e9 * defaults.PREDICTED_BANDWIDTH_EFFICIENCY))
    assert "cpu-big" not in PUBLISHED


def test_context_length_uses_each_members_prompt_count_and_is_never_best_effort(family):
    pool = _pool({"f-p40": 1, "f-p60": 1})
    assert _best(family, pool, {}, prompt={"f-p40": 60, "f-p60": 60}, out=8) == "f-p60"
    assert _best(family, pool, {}, prompt={"f-p40": 50, "f-p60": 60}, out=8) == "f-p60"  # quality first
    assert _best(family, _pool({"f-p40": 1}), {}, prompt={"f-p40": 57}, out=8) is None  # 65 > 64
    assert _best(family, _pool({"f-p40": 1}), {}, prompt={"f-p40": 56}, out=8) == "f-p40"
    r = route(family, _pool({"f-p40": 1}), Budget(allow_best_effort=True), prompt_tokens=60, max_tokens=8)
    assert not r.choices and not best_effort(family, _pool({"f-p40": 1}), r, prompt_tokens=60, max_tokens=8)
    err = no_fit_error(r, Budget(), None, "prompt")
    assert err.status_code == 400 and err.code == "context_length_exceeded" and err.param == "prompt"


def test_queue_depth_moves_requests_to_the_idle_worker_then_to_a_smaller_member(family):
    pool = _pool({"f-p80": 2, "f-p60": 1})
    busy, idle = pool.for_member("f-p80")
    busy.running, busy.waiting = 2, 3  # +5 queued → ttft 150 + 250 ms
    r = route(family, pool, Budget(max_ttft_ms=300), prompt_tokens=10, max_tokens=8)
    assert r.choices[0].worker is idle
    idle.in_flight = 4  # the gateway's own count counts too
    assert _best(family, pool, {"max_ttft_ms": 300}) == "f-p60"
    # The static table (live=False) ignores load: the baseline the live router is compared with.
    assert route(family, pool, Budget(max_ttft_ms=300), prompt_tokens=10, max_tokens=8, live=False).choices[0].member.name == "f-p80"


def test_observed_slowness_corrects_the_prediction(family):
    pool = _pool({"f-p80": 2})
    slow, fast = pool.for_member("f-p80")
    for _ in range(10):  # this worker keeps answering 3x slower than the registry predicts
        slow.observe(0.150, 0.450, 0.020, 0.060)
    assert slow.ratios() == pytest.approx((3.0, 3.0), rel=0.1)
    r = route(family, pool, Budget(), prompt_tokens=10, max_tokens=8)
    assert r.choices[0].worker is fast
    assert r.choices[1].predicted.ttft_s == pytest.approx(3 * r.choices[0].predicted.ttft_s, rel=0.1)
    fast.speed = Speed(ttft=3.0)
    assert not route(family, pool, Budget(max_ttft_ms=300), prompt_tokens=10, max_tokens=8).choices


def test_a_worker_judged_too_slow_is_tried_again_once_its_observed_ratio_fades(family):
    """Too slow for a budget, a worker gets no traffic, so nothing new is observed of it: its ratio's
    excess over 1 halves every RATIO_HALF_LIFE_S, and once the prediction fits again it is tried again
    (a burst of slow answers does not shut it out of tight budgets for good)."""
    pool = _pool({"f-p80": 1})
    [w] = pool.for_member("f-p80")
    now = time.monotonic()
    w.speed = Speed(ttft=3.0, at=now)  # 450 ms against 300: just observed, too slow
    assert not route(family, pool, Budget(max_ttft_ms=300), prompt_tokens=10, max_tokens=8).choices
    w.speed = Speed(ttft=3.0, at=now - 2 * RATIO_HALF_LIFE_S)  # nothing seen since: 1 + 2/4, 225 ms
    assert route(family, pool, Budget(max_ttft_ms=300), prompt_tokens=10, max_tokens=8).choices


def test_idle_routing_ignores_load_but_keeps_the_observed_speed(family):
    """What would fit with no load (admission control: worth waiting for) is judged at the worker's
    observed speed: a worker slower than its profile does not fit an idle budget it only fits on paper,
    so a request it cannot meet gets a 422, not a 503 'busy' that no retry would fix."""
    pool = _pool({"f-p80": 1})
    [w] = pool.for_member("f-p80")
    w.running, w.waiting = 2, 3  # +5 queued → ttft 150 + 250 ms
    assert not route(family, pool, Budget(max_ttft_ms=300), prompt_tokens=10, max_tokens=8).choices
    assert route(family, pool, Budget(max_ttft_ms=300), prompt_tokens=10, max_tokens=8, idle=True).choices  # only load stands in the way
    w.speed = Speed(ttft=3.0)  # and now it is slower than its profile: 450 ms even idle
    assert not route(family, pool, Budget(max_ttft_ms=300), prompt_tokens=10, max_tokens=8, idle=True).choices
    assert route(family, pool, Budget(max_ttft_ms=300), prompt_tokens=10, max_tokens=8, live=False).choices  # the static table still fits


def test_a_deadline_first_worker_is_predicted_without_queueing_for_requests_with_a_latency_budget(family):
    """The same loaded worker, 5 requests ahead (the law adds 50 ms of TTFT each): on an engine that
    serves requests with a latency budget first (server.deadline_scheduling), such a request is predicted
    as if its member were alone, scaled by what such requests on that worker took against that."""
    pool = _shared_pool(["f-p100", "f-p80"])
    p100, p80 = pool.workers
    p80.running, p80.waiting = 2, 3
    p100.running = 2
    assert not route(family, pool, Budget(max_ttft_ms=300), prompt_tokens=10, max_tokens=8).choices  # 150 + 250 ms + siblings
    for w in pool.workers:
        w.spec = w.spec.model_copy(update={"deadline_scheduling": True})
    (choice,) = [c for c in route(family, pool, Budget(max_ttft_ms=300), prompt_tokens=10, max_tokens=8).choices if c.member.name == "f-p80"]
    assert choice.predicted.ttft_s == pytest.approx(0.150) and choice.predicted.tpot_s == pytest.approx(0.020)  # as if alone
    # ... but for the other requests served deadline first: its member's (2, +50 ms each) and its sibling's (one step of 40 ms).
    p80.first_in_flight, p100.first_in_flight = 2, 1
    (busy,) = [c for c in route(family, pool, Budget(max_ttft_ms=600), prompt_tokens=10, max_tokens=8).choices if c.member.name == "f-p80"]
    assert busy.predicted.ttft_s == pytest.approx(0.150 + 0.100 + 0.040) and busy.predicted.tpot_s == pytest.approx(0.020 + 0.040)
    p80.first_in_flight = p100.first_in_flight = 0
    # Without a latency budget it is served in turn: the prediction still counts the queue and the sibling.
    plain = [c for c in route(family, pool, Budget(), prompt_tokens=10, max_tokens=8).choices if c.member.name == "f-p80"][0]
    assert plain.predicted.ttft_s > 0.150 + 0.250 and choice.first and not plain.first
    # Each kind learns from its own observations: the rest waiting longer says nothing of deadline-first requests.
    for _ in range(10):
        p80.observe(0.4, 1.2, 0.02, 0.06)  # requests without a budget, 3x slower than predicted
        p80.observe(0.15, 0.30, 0.02, 0.04, first=True)  # deadline first, 2x
    again = [c for c in route(family, pool, Budget(max_ttft_ms=600), prompt_tokens=10, max_tokens=8).choices if c.member.name == "f-p80"][0]
    assert p80.ratios() == pytest.approx((3.0, 3.0), rel=0.1) and p80.ratios(first=True) == pytest.approx((2.0, 2.0), rel=0.1)
    assert again.predicted.ttft_s == pytest.approx(2 * 0.150, rel=0.1) and again.predicted.tpot_s == pytest.approx(2 * 0.020, rel=0.1)


def test_unavailable_workers_and_excluded_ones_are_skipped(family):
    pool = _pool({"f-p100": 2, "f-p80": 1})
    a, b = pool.for_member("f-p100")
    a.healthy = False
    assert route(family, pool, Budget(), prompt_tokens=10, max_tokens=8).choices[0].worker is b
    r = route(family, pool, Budget(), prompt_tokens=10, max_tokens=8, exclude={b.name})
    assert r.choices[0].member.name == "f-p80"  # the next member: a fallback
    r = route(family, pool, Budget(), prompt_tokens=10, max_tokens=8, pinned="f-p100", exclude={b.name})
    assert not r.choices
    err = no_fit_error(r, Budget(), "f-p100")
    assert err.status_code == 503 and err.headers["Retry-After"]


def test_no_fit_names_the_failed_constraint_and_the_closest_member(family):
    r = route(family, _pool(ALL), Budget(max_latency_ms=50), prompt_tokens=10, max_tokens=8)
    err = no_fit_error(r, Budget(max_latency_ms=50), None)
    assert err.status_code == 422 and err.type == "budget_error" and err.param == "budget.max_latency_ms"
    assert "f-p60" in err.message  # 65 ms: the closest
    assert [c.member.name for c in best_effort(family, _pool(ALL), r, prompt_tokens=10, max_tokens=8)][0] == "f-p60"


def test_ties_on_quality_go_to_lower_perplexity_then_smaller(family):
    fam = family
    for m in fam.registry.members:
        m.accuracy = [a for a in m.accuracy if a.metric != "chat_agreement"]
        if not m.is_parent:
            m.accuracy.append(AccuracyRecord(metric="chat_agreement", value=0.8, data="test"))
    fam.registry.member("f-p60").accuracy.append(AccuracyRecord(metric="perplexity", value=22.0, data="test"))
    assert _best(fam, _pool({"f-p80": 1, "f-p60": 1}), {}) == "f-p60"  # 22 < 24
    fam.registry.member("f-p60").accuracy.append(AccuracyRecord(metric="perplexity", value=24.0, data="test"))
    assert _best(fam, _pool({"f-p80": 1, "f-p60": 1}), {}) == "f-p60"  # same perplexity: the smaller


# --- fitness: routed traffic never reaches an unfit member (issue 10) -------------------------------


def _degenerate(family: Family, name: str, share: float = 0.25) -> None:
    family.registry.member(name).accuracy.append(AccuracyRecord(metric="degenerate_answers", value=share, data="chat", tokens=8))


def test_routed_traffic_never_reaches_an_unfit_member_even_the_only_one_that_fits(family):
    _degenerate(family, "f-p60")
    budget = Budget(max_latency_ms=100)  # only f-p60 (65 ms) fits
    r = route(family, _pool(ALL), budget, prompt_tokens=10, max_tokens=8)
    assert not r.choices
    (verdict,) = [v for v in r.refused if v.member == "f-p60"]
    assert verdict.constraint == "unfit" and "25% degenerate chat answers of 8 prompts" in verdict.detail
    err = no_fit_error(r, budget, None)
    assert err.status_code == 422 and "never routed to: f-p60 (25% degenerate" in err.message
    assert err.param == "budget.max_latency_ms" and "closest member: f-p40" in err.message  # one relaxing the budget can reach
    # Without a budget it is not among the candidates at all.
    assert "f-p60" not in [c.member.name for c in route(family, _pool(ALL), Budget(), prompt_tokens=10, max_tokens=8).choices]


def test_best_effort_never_picks_an_unfit_member(family):
    r = route(family, _pool(ALL), Budget(max_latency_ms=50), prompt_tokens=10, max_tokens=8)
    assert best_effort(family, _pool(ALL), r, prompt_tokens=10, max_tokens=8)[0].member.name == "f-p60"  # closest: 65 ms
    _degenerate(family, "f-p60")
    r = route(family, _pool(ALL), Budget(max_latency_ms=50), prompt_tokens=10, max_tokens=8)
    picks = [c.member.name for c in best_effort(family, _pool(ALL), r, prompt_tokens=10, max_tokens=8)]
    assert picks == ["f-p40", "f-p80", "f-p100"]  # closest first (f-p40: never profiled), never f-p60


def test_the_familys_chat_agreement_floor_makes_members_unfit(family):
    family.registry.fitness = FitnessPolicy(min_chat_agreement=0.8)  # f-p60 (0.7) and f-p40 (0.5) fall under it
    assert _best(family, _pool(ALL), {"max_memory_gb": 3.0}) == "f-p80"
    assert _best(family, _pool(ALL), {"max_memory_gb": 2.45}) is None  # f-p60 and f-p40 would fit, but are unfit
    family.registry.fitness = FitnessPolicy(min_chat_agreement=0.7)  # at the floor is fit
    assert _best(family, _pool(ALL), {"max_memory_gb": 2.45}) == "f-p60"


def test_when_a_fit_member_has_no_worker_it_is_a_503_and_when_none_is_fit_a_422_naming_them(family):
    _degenerate(family, "f-p60")
    r = route(family, _pool({"f-p60": 1}), Budget(), prompt_tokens=10, max_tokens=8)  # only the unfit member has workers
    assert not r.choices and no_fit_error(r, Budget(), None).status_code == 503
    family.problems = {"f-p100": "weight file missing"}
    family.registry.fitness = FitnessPolicy(min_chat_agreement=0.95)
    r = route(family, _pool(ALL), Budget(), prompt_tokens=10, max_tokens=8)
    assert not r.choices and {v.constraint for v in r.refused} == {"unfit"}
    err = no_fit_error(r, Budget(), None)
    assert err.status_code == 422 and err.code == "members_unfit" and err.param == "model"
    assert all(n in err.message for n in ("f-p80", "f-p60", "f-p40"))


def test_a_pinned_unfit_member_is_still_served_with_a_warning(family):
    _degenerate(family, "f-p60")
    (choice,) = route(family, _pool(ALL), Budget(), prompt_tokens=10, max_tokens=8, pinned="f-p60").choices
    assert choice.member.name == "f-p60" and choice.reason == "pinned"
    assert choice.warning == "member f-p60 is unfit: 25% degenerate chat answers of 8 prompts (max 0%)"
    # ... and as best effort when pinned with a budget it misses.
    r = route(family, _pool(ALL), Budget(max_latency_ms=10), prompt_tokens=10, max_tokens=8, pinned="f-p60")
    (choice,) = best_effort(family, _pool(ALL), r, prompt_tokens=10, max_tokens=8)
    assert choice.member.name == "f-p60" and choice.warning.startswith("member f-p60 is unfit")
    # A fit member carries no warning, pinned or routed.
    assert route(family, _pool(ALL), Budget(), prompt_tokens=10, max_tokens=8, pinned="f-p80").choices[0].warning is None
    assert all(c.warning is None for c in route(family, _pool(ALL), Budget(), prompt_tokens=10, max_tokens=8).choices)


def test_a_worker_serving_bfloat16_is_routed_on_the_members_bfloat16_figures(family):
    """f-p80 keeps 0.9 chat agreement at float32 and 0.84 at bfloat16; a worker of the device class
    `cpu-bf16` serves it at bfloat16 (its profile there says so): a 0.85 floor fits only the float32 one."""
    m = family.registry.member("f-p80")
    m.latency["cpu-bf16"] = m.latency["cpu"].model_copy(update={"device_class": "cpu-bf16", "dtype": "bfloat16"})
    assert m.serving_dtype("cpu-bf16") == "bfloat16" and m.serving_dtype("cpu") == "float32"
    specs = [WorkerSpec(url="http://127.0.0.1:9601", member="f-p80", device_class="cpu-bf16"),
             WorkerSpec(url="http://127.0.0.1:9602", member="f-p80", device_class="cpu")]
    pool = Pool(specs, None, GatewayMetrics())
    for w in pool.workers:
        w.healthy = True
    bf16_only = {"http://127.0.0.1:9602"}
    r = route(family, pool, Budget(min_accuracy=0.85), prompt_tokens=10, max_tokens=8, exclude=bf16_only)
    (verdict,) = [v for v in r.refused if v.member == "f-p80"]
    assert not r.choices and verdict.detail == "accuracy at bfloat16, its dtype on cpu-bf16, not measured (run family eval --dtype bfloat16)"
    m.accuracy.append(AccuracyRecord(metric="chat_agreement", value=0.84, data="test", dtype="bfloat16"))
    r = route(family, pool, Budget(min_accuracy=0.85), prompt_tokens=10, max_tokens=8, exclude=bf16_only)
    (verdict,) = [v for v in r.refused if v.member == "f-p80"]
    assert not r.choices and verdict.detail == "accuracy 0.840 < 0.85"
    (choice,) = route(family, pool, Budget(min_accuracy=0.85), prompt_tokens=10, max_tokens=8).choices
    assert choice.worker.spec.device_class == "cpu"
    assert {c.worker.spec.device_class for c in route(family, pool, Budget(min_accuracy=0.8), prompt_tokens=10, max_tokens=8).choices} == {"cpu", "cpu-bf16"}
    # Unfit at bfloat16 only: never routed there, still routed to the float32 worker.
    family.registry.fitness = FitnessPolicy(min_chat_agreement=0.85)
    r = route(family, pool, Budget(), prompt_tokens=10, max_tokens=8)
    assert [c.worker.spec.device_class for c in r.choices if c.member.name == "f-p80"] == ["cpu"]


def _shared_pool(members: list[str], url: str = "http://127.0.0.1:9500") -> Pool:
    """One worker process serving several members (one URL), as `family serve` runs local members."""
    pool = Pool([WorkerSpec(url=url, member=m, device_class="cpu") for m in members], None, GatewayMetrics())
    for w in pool.workers:
        w.healthy = True
    return pool


def test_a_busy_sibling_on_a_shared_worker_slows_every_step_of_a_member(family):
    # Idle, p60 fits 100 ms (30 ms + 7 × 5 ms). With the parent running 2 requests on the same
    # worker, each of p60's steps also waits for one of the parent's (40 ms): 30 + 40 + 7 × 45 ms.
    pool = _shared_pool(["f-p100", "f-p60"])
    assert _best(family, pool, {"max_latency_ms": 100}) == "f-p60"
    parent, p60 = pool.workers
    assert pool.siblings(p60) == [parent]
    parent.running = 2
    r = route(family, pool, Budget(max_latency_ms=100), prompt_tokens=10, max_tokens=8)
    assert r.choices == [] and any(v.member == "f-p60" and v.constraint == "max_latency_ms" for v in r.refused)
    [choice] = route(family, pool, Budget(max_latency_ms=500), prompt_tokens=10, max_tokens=8, pinned="f-p60").choices
    assert choice.predicted.tpot_s == pytest.approx(0.045) and choice.predicted.ttft_s == pytest.approx(0.070)
    assert choice.baseline.tpot_s == pytest.approx(0.045)  # the ratios the gateway learns correct what is left
    # Idle admission (what would fit with no load) and the static table ignore siblings, as they ignore load.
    assert route(family, pool, Budget(max_latency_ms=100), prompt_tokens=10, max_tokens=8, idle=True).choices
    assert _best(family, pool, {"max_latency_ms": 100}, live=False) == "f-p60"


def test_a_busy_member_on_another_worker_costs_nothing(family):
    pool = _pool({"f-p100": 1, "f-p60": 1})
    parent = pool.for_member("f-p100")[0]
    parent.running = 2
    assert pool.siblings(pool.for_member("f-p60")[0]) == []
    assert _best(family, pool, {"max_latency_ms": 100}) == "f-p60"
