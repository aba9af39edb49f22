"""What a budget's limits say about one member (family/fit.py), the checks that members_fitting and the
gateway's router share: which limit fails, and by how much, so that best effort can pick the closest."""

from __future__ import annotations

import pytest

from family.fit import latency_verdict, static_verdict
from family.latency import LatencyPrediction
from family.registry import AccuracyRecord, MemberRecord


def _member(agreement: float | None = 0.8, dtype: str = "float32") -> MemberRecord:
    m = MemberRecord(name="m-p80", path="m-p80", architecture="LlamaForCausalLM", parameters=250_000_000,
                     bytes={"float32": 10**9, "bfloat16": 5 * 10**8}, max_model_len=1000, files={})
    if agreement is not None:
        m.accuracy.append(AccuracyRecord(metric="chat_agreement", value=agreement, data="chat.jsonl", dtype=dtype))
    return m


def test_a_member_within_every_static_limit_has_no_verdict():
    assert static_verdict(_member(), "cpu", None, need_tokens=1000, max_memory_gb=1.0, min_accuracy=0.8) is None


@pytest.mark.parametrize("kwargs, constraint, violation", [
    ({"need_tokens": 1500}, "context_length", 0.5),
    ({"need_tokens": 10, "max_memory_gb": 0.8}, "max_memory_gb", 0.25),  # 1 GB of fp32 weights, never profiled
    ({"need_tokens": 10, "min_accuracy": 0.9}, "min_accuracy", 0.9 / 0.8 - 1),
])
def test_the_failed_limit_is_named_with_its_violation_relative_to_the_limit(kwargs, constraint, violation):
    v = static_verdict(_member(), "cpu", None, **kwargs)
    assert v is not None and v.member == "m-p80" and v.constraint == constraint
    assert v.violation == pytest.approx(violation)


def test_accuracy_measured_only_at_another_dtype_fails_any_floor():
    v = static_verdict(_member(0.95, dtype="bfloat16"), "cpu", None, need_tokens=10, min_accuracy=0.1)
    assert v is not None and v.constraint == "min_accuracy" and "not measured" in v.detail
    assert static_verdict(_member(0.95, dtype="bfloat16"), "cpu", None, need_tokens=10) is None  # no floor, no check


def test_latency_limits_against_a_prediction():
    pred = LatencyPrediction(ttft_s=0.2, tpot_s=0.05, e2e_s=1.0)
    m = _member()
    assert latency_verdict(m, pred, max_ttft_ms=200, max_latency_ms=1000, max_tpot_ms=50) is None
    over = latency_verdict(m, pred, max_latency_ms=800)
    assert over.constraint == "max_latency_ms" and over.violation == pytest.approx(0.25)
    assert latency_verdict(m, pred, max_tpot_ms=40).constraint == "max_tpot_ms"
    assert latency_verdict(m, None) is None  # no limit asked: no profile needed
    assert latency_verdict(m, None, max_ttft_ms=10_000).constraint == "max_ttft_ms"  # no profile fails any limit
