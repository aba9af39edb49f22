"""Serving memory in parts (issue 11): the probe measures runtime, weights and KV per token of real
members; the registry records the breakdown and says which figure is which; `max_memory_gb` selects by
the member's own need (weights + KV cache), never by a worker's RSS that is mostly the shared runtime."""

from __future__ import annotations

import json

import pytest

from family.memory import measure_memory, probe
from family.fit import members_fitting
from family.registry import (
    DTYPE_BYTES,
    LatencyProfile,
    MemoryBreakdown,
    kv_values_per_token,
    load_family,
    memory_bytes,
    read_registry,
)
from tests.family.test_registry_api import build_tiny_family

GB = 10**9


@pytest.fixture(scope="module")
def tiny_family(tiny_parent_dir, tmp_path_factory):
    return build_tiny_family(tiny_parent_dir, tmp_path_factory.mktemp("mem") / "fam", fractions=(0.6,))


def _check(fam, probe, dtype):
    for name in ("tiny-p100", "tiny-p60"):
        rec, got = fam.registry.member(name), probe.members[str(fam.member_dir(name))]
        config = json.loads((fam.member_dir(name) / "config.json").read_text())
        # KV per token, from the cache a real forward pass filled, equals the config's count at the dtype
        assert got.kv_bytes_per_token == kv_values_per_token(config) * DTYPE_BYTES[dtype] == rec.kv_values_per_token * DTYPE_BYTES[dtype]
        # Weights as loaded: every stored parameter once (tied embeddings once) at the serving dtype, plus
        # the rotary buffer (a few hundred bytes at most).
        assert 0 <= got.weights_bytes - rec.parameters * DTYPE_BYTES[dtype] < 1024
    assert probe.dtype == dtype


def test_probe_measures_runtime_weights_and_kv_of_real_members(tiny_family):
    """In a fresh process (the runtime measured once, before any member is loaded), float32."""
    fam = load_family(tiny_family)
    probe = measure_memory([fam.member_dir("tiny-p100"), fam.member_dir("tiny-p60")], "float32")
    _check(fam, probe, "float32")
    assert probe.runtime_bytes > 100e6  # interpreter + torch + transformers + the HTTP stack


def test_probe_at_bf16_weighs_half(tiny_family):
    """In this process (its runtime figure is meaningless here; weights and KV are not)."""
    fam = load_family(tiny_family)
    _check(fam, probe([fam.member_dir("tiny-p100"), fam.member_dir("tiny-p60")], "bfloat16"), "bfloat16")


def test_probe_counts_the_kv_cache_at_the_engines_dtype_and_the_decoder_holds_exactly_that(tiny_family):
    """The torch engine keeps bf16 weights but a float32 KV cache (its CPU attention is slow at bf16):
    the probe counts the cache at the engine's dtype, and the decoder's cache is that size."""
    import torch
    from transformers import AutoModelForCausalLM

    from family import defaults
    from server.decoder import StaticDecoder
    from server.layout import plan_layout

    fam = load_family(tiny_family)
    d = fam.member_dir("tiny-p60")
    got = probe([d], "bfloat16", kv_dtype=defaults.TORCH_KV_DTYPE)
    rec = fam.registry.member("tiny-p60")
    assert got.kv_dtype == "float32" and got.members[str(d)].kv_bytes_per_token == rec.kv_values_per_token * 4
    assert 0 <= got.members[str(d)].weights_bytes - rec.parameters * 2 < 1024  # the weights stay bf16
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    dec = StaticDecoder(model, plan_layout(model, "bfloat16", "dense", kernel="aten"), max_slots=4, max_len=64, min_width=8)
    dec.reserve(4, 64)
    assert dec.cache_bytes() == 4 * 64 * got.members[str(d)].kv_bytes_per_token


def test_breakdown_parts_and_which_figure_is_which():
    mem = MemoryBreakdown(dtype="float32", weights_bytes=400, kv_bytes_per_token=3, kv_batch=4, kv_context=10,
                          runtime_bytes=1000, runtime_shared_by=4, worker_peak_rss_bytes=1500)
    assert mem.kv_cache_bytes == 120
    assert mem.member_bytes == 520  # weights + KV: the member's own need
    assert mem.runtime_share_bytes == 250  # the runtime paid once on a host serving 4 members
    assert mem.serving_bytes == 770
    alone = mem.model_copy(update={"runtime_shared_by": 1})
    assert alone.serving_bytes == 1520 and alone.member_bytes == 520


def _profile(need_weights: int, kv: int, rss: int) -> LatencyProfile:
    return LatencyProfile(device_class="cpu", engine="torch", peak_memory_bytes=rss,
                          memory=MemoryBreakdown(dtype="float32", weights_bytes=need_weights, kv_bytes_per_token=kv, kv_batch=16,
                                                 kv_context=512, runtime_bytes=rss - need_weights, runtime_shared_by=2,
                                                 worker_peak_rss_bytes=rss))


def test_max_memory_gb_selects_by_the_members_own_need(tiny_family):
    """Two workers of ~1.9 GB RSS each (the runtime), members of 0.54 and 0.38 GB weights: a budget
    between their needs picks the smaller member; the RSS would have put both over it."""
    fam = load_family(tiny_family)
    p100, p60 = fam.registry.member("tiny-p100"), fam.registry.member("tiny-p60")
    p100.latency["cpu"] = _profile(538_000_000, 46_080, 1_870_000_000)
    p60.latency["cpu"] = _profile(377_000_000, 46_080, 1_860_000_000)
    fam.save()
    fam = load_family(tiny_family)  # the breakdown round-trips through family.json
    p100, p60 = fam.registry.member("tiny-p100"), fam.registry.member("tiny-p60")
    kv = 46_080 * 16 * 512
    assert memory_bytes(p100, "cpu") == 538_000_000 + kv and memory_bytes(p60, "cpu") == 377_000_000 + kv
    budget = (memory_bytes(p100, "cpu") + memory_bytes(p60, "cpu")) / 2 / GB
    assert budget < 1.86  # under either worker's RSS
    assert [m.name for m in members_fitting(fam, device_class="cpu", max_memory_gb=budget)] == ["tiny-p60"]
    assert [m.name for m in members_fitting(fam, device_class="cpu", max_memory_gb=1.0)] == ["tiny-p100", "tiny-p60"]
    assert members_fitting(fam, device_class="cpu", max_memory_gb=0.3) == []
    # An older profile without a breakdown: the weights at its dtype, not its worker's RSS.
    p60.latency["old"] = LatencyProfile(device_class="old", engine="torch", dtype="bfloat16", peak_memory_bytes=1_800_000_000)
    assert memory_bytes(p60, "old") == 2 * p60.parameters
    assert read_registry(tiny_family).member("tiny-p60").latency["cpu"].memory.runtime_shared_by == 2
