"""family.json beyond the basics: every field round-trips, sync keeps measurements only of unchanged
members, repeated SIGKILLs mid-write, `family verify` exit codes, and the static figures the gateway
routes from (quality, memory_bytes, members_fitting)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from family import storage
from family.fit import members_fitting
from family.registry import (
    SCHEMA_VERSION,
    AccuracyRecord,
    FamilyRegistry,
    LatencyProfile,
    LatencySample,
    MemoryBreakdown,
    load_family,
    member_name,
    memory_bytes,
    parent_name,
    read_registry,
    registry_path,
    save_registry,
    sync_family,
)

REPO = Path(__file__).resolve().parents[2]


def build_tiny_family(parent_dir: Path, root: Path, fractions=(0.6,), name: str = "tiny") -> Path:
    """A family folder: the tiny parent as `<name>-p100` plus plain-SVD members (no healing), registered."""
    from plrd.factorize import count_parameters, factorize

    parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(parent_dir)
    pdir = root / parent_name(name)
    parent.save_pretrained(pdir)
    tok.save_pretrained(pdir)
    for frac in fractions:
        member = factorize(parent, frac, count_parameters(parent), grams=None, allocation="uniform", progress=False)
        d = root / member_name(name, frac)
        member.save_pretrained(d)
        tok.save_pretrained(d)
        (d / "provenance.json").write_text(json.dumps({"method": "plain-svd", "target": frac, "derived_from": parent_name(name)}))
    sync_family(root, parent_dir=pdir, family_name=name)
    return root


@pytest.fixture()
def tiny_family(tiny_parent_dir, tmp_path) -> Path:
    return build_tiny_family(tiny_parent_dir, tmp_path / "fam")


def _sample(p, o, c, ttft, tpot):
    return LatencySample(prompt_tokens=p, output_tokens=o, concurrency=c, ttft_s=ttft, tpot_s=tpot,
                         e2e_s=ttft + tpot * (o - 1), throughput_tok_s=c * o / (ttft + tpot * (o - 1)))


def test_sync_describes_members_on_disk(tiny_family):
    reg = read_registry(tiny_family)
    assert reg.schema_version == SCHEMA_VERSION and reg.parent == "tiny-p100"
    assert reg.names() == ["tiny-p100", "tiny-p60"]
    parent, member = reg.member("tiny-p100"), reg.member("tiny-p60")
    assert parent.is_parent and parent.architecture == "LlamaForCausalLM" and parent.ranks == {}
    assert member.architecture == "LowRankLlamaForCausalLM" and member.ranks and member.derived_from == "tiny-p100"
    assert 0.5 < member.parameters / parent.parameters < 0.75
    for m in (parent, member):
        assert m.bytes == {"float32": 4 * m.parameters, "bfloat16": 2 * m.parameters, "float16": 2 * m.parameters}
        (fname, f), = m.files.items()
        assert fname == "model.safetensors" and f.sha256 == storage.sha256_file(tiny_family / m.path / fname)
    assert member.path == "tiny-p60"  # relative: the family folder can move


def test_schema_round_trip_keeps_measurements(tiny_family):
    reg = read_registry(tiny_family)
    m = reg.member("tiny-p60")
    m.accuracy.append(AccuracyRecord(metric="perplexity", value=31.5, data="test.txt", data_sha256="ab" * 32, tokens=2540,
                                     command="family eval --family x"))
    m.accuracy.append(AccuracyRecord(metric="top1_agreement", value=0.71, data="test.txt", reference="tiny-p100"))
    m.latency["cpu-2core"] = LatencyProfile(
        device_class="cpu-2core", engine="torch", samples=[_sample(32, 16, 1, 0.05, 0.02), _sample(256, 16, 4, 0.4, 0.03)],
        peak_memory_bytes=123_456_789, latency_model={"a0": 0.01, "b0": 0.02}, command="family profile",
    )
    save_registry(tiny_family, reg)
    again = read_registry(tiny_family)
    assert again.model_dump() == reg.model_dump()
    assert FamilyRegistry.model_validate_json(again.model_dump_json()) == again
    assert again.member("tiny-p60").metric("perplexity") == 31.5


def test_sync_keeps_measurements_of_unchanged_members_only(tiny_family):
    fam = load_family(tiny_family)
    for m in fam.registry.members:
        m.accuracy.append(AccuracyRecord(metric="top1_agreement", value=0.5, data="x"))
    fam.save()
    sync_family(tiny_family, parent_dir=tiny_family / "tiny-p100")
    assert all(m.accuracy for m in read_registry(tiny_family).members)
    model = AutoModelForCausalLM.from_pretrained(tiny_family / "tiny-p60")  # rebuilt with other weights
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(tiny_family / "tiny-p60")
    reg = sync_family(tiny_family, parent_dir=tiny_family / "tiny-p100")
    assert reg.member("tiny-p60").accuracy == [] and reg.member("tiny-p100").accuracy


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from family.registry import AccuracyRecord, read_registry, save_registry
    root = Path(sys.argv[1])
    reg = read_registry(root)
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        m = reg.members[i % len(reg.members)]
        # vary the size so that a torn write would show as truncated or mixed JSON
        m.accuracy = [AccuracyRecord(metric="perplexity", value=float(i), data="x" * (i % 5000)) for _ in range(1 + i % 40)]
        save_registry(root, reg)
""")


def test_repeated_sigkill_mid_write_never_leaves_a_bad_registry(tiny_family):
    for delay in (0.25, 0.4, 0.55, 0.75, 1.0):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tiny_family)], cwd=REPO, stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reg = read_registry(tiny_family)  # raises on torn or invalid JSON
        assert reg.names() == ["tiny-p100", "tiny-p60"]
        assert json.loads(registry_path(tiny_family).read_text())["schema_version"] == SCHEMA_VERSION


def test_touched_but_unchanged_file_passes_and_is_cheap_next_time(tiny_family):
    weights = tiny_family / "tiny-p60" / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    fam = load_family(tiny_family)
    assert fam.problems == {}
    fam.save()  # the new mtime is remembered: the next fast check does not hash again
    assert read_registry(tiny_family).member("tiny-p60").files["model.safetensors"].mtime_ns == weights.stat().st_mtime_ns


def test_truncated_weights_are_named_and_not_servable(tiny_family):
    (tiny_family / "tiny-p100" / "model.safetensors").write_bytes(b"short")
    fam = load_family(tiny_family)
    assert list(fam.problems) == ["tiny-p100"] and "changed size" in fam.problems["tiny-p100"]
    assert [m.name for m in fam.servable] == ["tiny-p60"]
    assert members_fitting(fam, device_class="cpu") == [fam.registry.member("tiny-p60")]


def _flip_byte_keep_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_cli_exits_non_zero_and_names_the_member(tiny_family):
    cmd = [sys.executable, "-m", "family.cli", "verify", "--family", str(tiny_family), "--full"]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "tiny-p60: ok" in ok.stdout
    _flip_byte_keep_mtime(tiny_family / "tiny-p60" / "model.safetensors")
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "tiny-p60: checksum mismatch" in bad.stdout and "tiny-p100: ok" in bad.stdout
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 member(s) failed verification: tiny-p60")


# --- what the gateway reads ------------------------------------------------------------------------


@pytest.fixture()
def measured(tiny_family):
    """Registry figures (test data, set by hand) for the static filter."""
    fam = load_family(tiny_family)
    p100, p60 = fam.registry.member("tiny-p100"), fam.registry.member("tiny-p60")
    p100.accuracy.append(AccuracyRecord(metric="perplexity", value=20.0, data="x"))
    p60.accuracy += [AccuracyRecord(metric="perplexity", value=30.0, data="x"),
                     AccuracyRecord(metric="chat_agreement", value=0.5, data="x"),
                     AccuracyRecord(metric="chat_agreement", value=0.7, data="x")]  # the newest counts
    # parent: 0.4 s to first token, 50 ms/token, needs 2 GB; p60: 0.1 s, 20 ms/token, 1 GB (weights +
    # KV cache), both in workers of 3 GB RSS (the runtime, which does not count).
    zero = {"a1": 0.0, "a2": 0.0, "a3": 0.0, "b1": 0.0, "b2": 0.0}

    def need(weights: int) -> MemoryBreakdown:
        return MemoryBreakdown(dtype="float32", weights_bytes=weights, kv_bytes_per_token=1000, kv_batch=10, kv_context=50_000,
                               runtime_bytes=1_000_000_000, worker_peak_rss_bytes=3_000_000_000)

    p100.latency["cpu"] = LatencyProfile(device_class="cpu", engine="torch", peak_memory_bytes=3_000_000_000,
                                         memory=need(1_500_000_000), latency_model={"a0": 0.4, "b0": 0.05, **zero})
    p60.latency["cpu"] = LatencyProfile(device_class="cpu", engine="torch", peak_memory_bytes=3_000_000_000,
                                        memory=need(500_000_000), latency_model={"a0": 0.1, "b0": 0.02, **zero})
    fam.save()
    return load_family(tiny_family)


def test_quality_and_memory_bytes(measured):
    p100, p60 = measured.registry.member("tiny-p100"), measured.registry.member("tiny-p60")
    assert p100.quality == 1.0 and p60.quality == 0.7
    assert p60.metric("perplexity") == 30.0 and p60.metric("lm_eval:boolq") is None
    assert memory_bytes(p60, "cpu") == 1_000_000_000  # measured need: weights + KV cache, not the worker's RSS
    assert memory_bytes(p60, "gpu-x") == p60.bytes["float32"] == memory_bytes(p60)  # an unknown device class: weights
    assert memory_bytes(p60, "h100") == p60.profile("h100").memory.member_bytes  # never profiled there: predicted
    assert memory_bytes(p60, None, "bfloat16") == 2 * p60.parameters


def test_members_fitting_applies_each_limit(measured):
    names = lambda **kw: [m.name for m in members_fitting(measured, device_class="cpu", **kw)]  # noqa: E731
    assert names() == ["tiny-p100", "tiny-p60"]  # best first
    assert names(max_memory_gb=1.5) == ["tiny-p60"]
    assert names(max_memory_gb=0.5) == []
    assert names(min_accuracy=0.8) == ["tiny-p100"]
    assert names(min_accuracy=0.6) == ["tiny-p100", "tiny-p60"]
    assert names(max_ttft_ms=200) == ["tiny-p60"]
    # end to end for 11 output tokens: parent 0.4 + 10·0.05 = 0.9 s; p60 0.1 + 10·0.02 = 0.3 s
    assert names(max_latency_ms=500, prompt_tokens=8, output_tokens=11) == ["tiny-p60"]
    assert names(max_latency_ms=1000, prompt_tokens=8, output_tokens=11) == ["tiny-p100", "tiny-p60"]
    assert names(context_tokens=10**6) == []
    assert names(prompt_tokens=2000, output_tokens=2000) == []  # beyond max_model_len
    # on a device class the registry knows nothing about: fits only budgets without latency limits
    assert [m.name for m in members_fitting(measured, device_class="gpu-x")] == ["tiny-p100", "tiny-p60"]
    assert members_fitting(measured, device_class="gpu-x", max_ttft_ms=10_000) == []
    # never profiled on a known device class: predicted from its bandwidth (tests/family/test_predicted.py)
    assert [m.name for m in members_fitting(measured, device_class="h100", max_ttft_ms=10_000)] == ["tiny-p100", "tiny-p60"]
    # unmeasured accuracy fits only budgets without an accuracy floor
    measured.registry.member("tiny-p60").accuracy.clear()
    assert names(min_accuracy=0.1) == ["tiny-p100"]
    assert names() == ["tiny-p100", "tiny-p60"]
    # a registry (not a loaded family) is filtered too, without verification
    assert [m.name for m in members_fitting(measured.registry, device_class="cpu", max_memory_gb=1.5)] == ["tiny-p60"]


def test_concurrent_recorders_do_not_lose_each_others_measurements(tiny_family):
    """Two processes (say `family eval` and `family profile`) each holding the registry in memory
    record measurements: both survive, unlike a plain whole-file save (last writer wins)."""
    a, b = load_family(tiny_family), load_family(tiny_family)
    a.record("tiny-p60", accuracy=[AccuracyRecord(metric="perplexity", value=40.0, data="x")])
    b.record("tiny-p60", latency=LatencyProfile(device_class="cpu", engine="torch", peak_memory_bytes=5))
    b.record("tiny-p100", accuracy=[AccuracyRecord(metric="perplexity", value=20.0, data="x")])
    reg = read_registry(tiny_family)
    assert reg.member("tiny-p60").metric("perplexity") == 40.0 and reg.member("tiny-p60").latency["cpu"].peak_memory_bytes == 5
    assert reg.member("tiny-p100").metric("perplexity") == 20.0
    assert b.registry.member("tiny-p60").metric("perplexity") == 40.0  # b now holds the merged registry
