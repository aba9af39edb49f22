"""The latency model: its law, a non-negative fit that survives noise, and the registry's prediction."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from family import latency
from family.registry import LatencyProfile, MemberRecord

TRUTH = {"a0": 0.03, "a1": 0.0008, "a2": 0.0004, "a3": 0.02, "b0": 0.015, "b1": 0.003, "b2": 2e-6}


def _samples(law, shapes, noise=0.0, seed=0):
    rng = random.Random(seed)
    out = []
    for p, o, c in shapes:
        pred = latency.predict(law, p, o, c)
        ttft, tpot = pred.ttft_s * (1 + rng.uniform(-noise, noise)), pred.tpot_s * (1 + rng.uniform(-noise, noise))
        out.append(SimpleNamespace(prompt_tokens=p, output_tokens=o, concurrency=c, ttft_s=ttft, tpot_s=tpot,
                                   e2e_s=ttft + tpot * (o - 1)))
    return out


GRID = [(p, o, c) for p in (32, 256) for o in (32,) for c in (1, 4, 8)]
HELD_OUT = [(128, 48, 2), (64, 16, 6), (200, 64, 1), (400, 8, 3)]


def test_the_law_is_physical():
    pred = latency.predict(TRUTH, 100, 20, 1)
    assert pred.ttft_s == pytest.approx(0.03 + 0.0008 * 100)  # no other requests: no queueing terms
    assert pred.tpot_s == pytest.approx(0.015 + 2e-6 * (100 + 10))
    assert pred.e2e_s == pytest.approx(pred.ttft_s + 19 * pred.tpot_s)
    # monotone in every input
    base = latency.predict(TRUTH, 100, 20, 2)
    for more in (latency.predict(TRUTH, 200, 20, 2), latency.predict(TRUTH, 100, 40, 2), latency.predict(TRUTH, 100, 20, 4)):
        assert more.e2e_s > base.e2e_s
    assert latency.predict(TRUTH, 100, 1, 1).e2e_s == pytest.approx(latency.predict(TRUTH, 100, 1, 1).ttft_s)
    assert latency.predict(TRUTH, 100, 20, 0).ttft_s == pred.ttft_s  # concurrency below 1 counts as 1


def test_fit_recovers_the_law_and_predicts_held_out_shapes():
    coef = latency.fit(_samples(TRUTH, GRID))
    for p, o, c in HELD_OUT:
        assert latency.predict(coef, p, o, c).e2e_s == pytest.approx(latency.predict(TRUTH, p, o, c).e2e_s, rel=1e-3)
    assert latency.fit_error(coef, _samples(TRUTH, HELD_OUT))["e2e"] < 1e-3


def test_noisy_fit_is_non_negative_and_close():
    samples = _samples(TRUTH, GRID * 2, noise=0.1, seed=1)
    coef = latency.fit(samples)
    assert set(coef) == set(latency.TTFT_TERMS + latency.TPOT_TERMS)
    assert all(v >= 0 for v in coef.values())
    err = latency.fit_error(coef, _samples(TRUTH, HELD_OUT))
    assert err["e2e"] < 0.15, err
    # data that would pull a coefficient negative (TTFT falling with the prompt) is clipped at zero
    odd = [SimpleNamespace(prompt_tokens=p, output_tokens=16, concurrency=1, ttft_s=1.0 - p / 1000, tpot_s=0.02) for p in (10, 100, 500)]
    assert latency.fit(odd)["a1"] == 0.0


def test_fit_needs_two_shapes():
    with pytest.raises(ValueError, match="at least two"):
        latency.fit(_samples(TRUTH, GRID[:1]))


def test_predict_latency_reads_the_members_profile():
    m = MemberRecord(name="m", path="m", architecture="LlamaForCausalLM", parameters=10, bytes={"float32": 40}, files={})
    assert latency.predict_latency(m, "cpu", 32, 16) is None  # never profiled
    m.latency["cpu"] = LatencyProfile(device_class="cpu", engine="torch")
    assert latency.predict_latency(m, "cpu", 32, 16) is None  # profiled, no model
    m.latency["cpu"].latency_model = TRUTH
    pred = latency.predict_latency(m, "cpu", 32, 16, concurrency=4)
    assert pred == latency.predict(TRUTH, 32, 16, 4)
    assert latency.predict_latency(m, "gpu-x", 32, 16) is None  # a device class nobody knows
    # a known device class never profiled: predicted from its bandwidth (tests/family/test_predicted.py)
    assert m.profile("h100").basis == "predicted" and latency.predict_latency(m, "h100", 32, 16).tpot_s > 0
