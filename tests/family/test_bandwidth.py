"""The bandwidth limit (issue 11): the STREAM-like read on this machine, and the roofline it implies."""

from __future__ import annotations

import pytest

from family.bandwidth import measure_bandwidth, measure_device, measure_matmul_flops, roofline_tok_s


def test_roofline_is_bandwidth_over_bytes_read_per_token():
    # batch 1: every weight once per token
    assert roofline_tok_s(10e9, 500_000_000) == pytest.approx(20.0)
    # batch 16 reads the weights once per step for 16 tokens
    assert roofline_tok_s(10e9, 500_000_000, batch=16) == pytest.approx(320.0)
    # ... plus each row's KV cache: 16 rows × 1000 tokens × 50 kB = 800 MB more per step
    assert roofline_tok_s(10e9, 500_000_000, batch=16, kv_bytes_per_token=50_000, context=1000) == pytest.approx(16 * 10e9 / 1.3e9)
    # fewer bytes, proportionally more tokens/s: the ratio a memory-bound member can reach
    assert roofline_tok_s(10e9, 350_000_000) / roofline_tok_s(10e9, 500_000_000) == pytest.approx(500 / 350)


def test_measured_bandwidth_reads_the_whole_buffer_best_of_n():
    bw = measure_bandwidth(64_000_000, repeats=3, threads=1)
    assert bw.buffer_bytes == 64_000_000 and bw.repeats == 3 and bw.threads == 1
    assert set(bw.per_kernel) == {"sum", "matvec", "matvec_t"}
    assert bw.bytes_per_s == max(bw.per_kernel.values()) == pytest.approx(bw.buffer_bytes / bw.best_s)
    assert 1e8 < bw.bytes_per_s < 1e13  # between a slow disk and the fastest HBM


def test_device_record_is_measured_at_the_serving_dtype():
    rec = measure_device("here", 16_000_000, dtype="float32", threads=1, repeats=2, command="test")
    assert rec.basis == "measured" and rec.device_class == "here" and rec.kernel in ("sum", "matvec", "matvec_t")
    assert rec.bandwidth_bytes_s > 0 and rec.matmul_flops > 1e8 and rec.source == "test"
    assert measure_matmul_flops("bfloat16", size=256, repeats=2, threads=1) > 1e7
