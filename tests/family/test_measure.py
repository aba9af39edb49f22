"""`family eval`, `family profile`, the latency model, `family show` and `family plot` on a tiny family."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

from family import latency
from family.registry import load_family, read_registry


def _family(*args):
    return subprocess.run([sys.executable, "-m", "family.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def measured(tiny_family_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("measured") / "fam"
    shutil.copytree(tiny_family_dir, root)
    done = _family("eval", "--family", str(root), "--windows", "4", "--seq-len", "64", "--answer-tokens", "8")
    assert done.returncode == 0, done.stderr
    done = _family("profile", "--family", str(root), "--device-class", "test-cpu", "--member", "tiny-p60", "--member", "tiny-p80",
                   "--concurrency", "1,2", "--prompt-tokens", "8,32", "--output-tokens", "6", "--rounds", "1")
    assert done.returncode == 0, done.stderr
    return root


def test_eval_stores_plausible_accuracy_records(measured):
    reg = read_registry(measured)
    parent, p60 = reg.member("tiny-p100"), reg.member("tiny-p60")
    assert parent.metric("top1_agreement") == 1.0 and parent.metric("mean_kl") == pytest.approx(0, abs=1e-6)
    assert 0 < p60.metric("top1_agreement") < 1.0 and p60.metric("mean_kl") > 0
    assert 1 < p60.metric("perplexity") < 1e4
    rec = next(r for r in p60.accuracy if r.metric == "perplexity")
    assert rec.data_sha256 and rec.tokens == 4 * 63 and "family eval" in rec.command
    assert p60.quality == p60.metric("chat_agreement") and parent.quality == 1.0


def test_profile_stores_samples_memory_and_a_fitted_model(measured):
    prof = read_registry(measured).member("tiny-p60").latency["test-cpu"]
    assert prof.engine == "torch" and len(prof.samples) == 4
    assert prof.threads == os.cpu_count()  # measured as `family serve` runs its one shared worker: every core
    assert all(s.ttft_s > 0 and s.tpot_s > 0 and s.throughput_tok_s > 0 for s in prof.samples)
    assert {(s.concurrency, s.output_tokens) for s in prof.samples} == {(1, 6), (2, 6)}
    assert prof.peak_memory_bytes > 50e6  # a Python process with torch loaded
    # how the torch worker served it while measured: each projection dense or a factor pair, by timing
    assert prof.serving["dtype"] == "float32" and prof.serving["how"] == "measured"
    assert sum(prof.serving["projections"].values()) == 2 * 7  # the tiny model's 2 layers × 7 projections
    assert set(prof.latency_model) == set(latency.TTFT_TERMS + latency.TPOT_TERMS)
    fam = load_family(measured)
    p60 = fam.registry.member("tiny-p60")
    mem = prof.memory  # in parts: the member's own need is weights + KV cache, the runtime is shared
    assert mem.basis == "measured" and mem.worker_peak_rss_bytes == prof.peak_memory_bytes
    assert 0 <= mem.weights_bytes - p60.bytes["float32"] < 1024 and mem.kv_bytes_per_token == 4 * p60.kv_values_per_token
    assert mem.runtime_bytes > 50e6 and mem.runtime_shared_by == 3  # one engine process for the family's 3 members
    assert p60.memory_bytes("test-cpu") == mem.member_bytes < prof.peak_memory_bytes
    assert p60.memory_bytes("other") == p60.bytes["float32"]  # an unknown device class: the weights
    dev = fam.registry.devices["test-cpu"]  # the bandwidth read over the parent's weights, recorded
    assert dev.basis == "measured" and dev.buffer_bytes == fam.registry.member("tiny-p100").bytes["float32"]


def test_profile_measures_the_members_in_one_torch_worker_as_served(measured):
    """`family serve` runs one torch worker for all members, so `family profile` measures them in one."""
    reg = read_registry(measured)
    p60, p80 = reg.member("tiny-p60").latency["test-cpu"], reg.member("tiny-p80").latency["test-cpu"]
    assert len(p80.samples) == len(p60.samples) == 4 and p80.serving["how"] == "measured"
    assert p80.peak_memory_bytes == p60.peak_memory_bytes  # one process: the same peak, with both loaded
    assert "test-cpu" not in reg.member("tiny-p100").latency  # not selected, not measured
    logs = sorted(f.name for f in (measured / "logs").glob("worker-*-torch.log"))
    assert logs == ["worker-shared-torch.log"]


def test_show_prints_every_member_and_plot_writes_a_png(measured, tmp_path):
    done = _family("show", "--family", str(measured))
    assert done.returncode == 0
    for name in ("tiny-p100", "tiny-p80", "tiny-p60", "test-cpu"):
        assert name in done.stdout
    out = tmp_path / "front.png"
    assert _family("plot", "--family", str(measured), "--out", str(out)).returncode == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        assert img.size[0] > 400 and img.size[1] > 200


def test_latency_model_recovers_a_known_law():
    truth = {"a0": 0.02, "a1": 0.001, "a2": 0.0005, "a3": 0.01, "b0": 0.01, "b1": 0.002, "b2": 1e-5}
    samples = []
    for p in (16, 64, 256):
        for c in (1, 2, 8):
            pred = latency.predict(truth, p, 32, c)
            samples.append(SimpleNamespace(prompt_tokens=p, output_tokens=32, concurrency=c, ttft_s=pred.ttft_s, tpot_s=pred.tpot_s))
    coef = latency.fit(samples)
    for p, o, c in ((100, 50, 3), (300, 10, 5)):
        assert latency.predict(coef, p, o, c).e2e_s == pytest.approx(latency.predict(truth, p, o, c).e2e_s, rel=1e-3)
    with pytest.raises(ValueError):
        latency.fit(samples[:1])


def test_cli_errors_are_one_line(measured):
    for args, words in ((["eval", "--family", "/nope"], "no registry"), (["eval", "--family", str(measured), "--member", "ghost"], "no member named"),
                        (["profile", "--family", str(measured), "--device-class", "x", "--concurrency", "a"], "--concurrency"),
                        (["profile", "--family", str(measured), "--device-class", "x", "--threads", "-1"], "--threads"),
                        (["worker", "--family", str(measured), "--member", "tiny-p60", "--engine", "vllm", "--threads", "2"], "--threads"),
                        (["worker", "--family", str(measured), "--member", "tiny-p60", "--kernel", "fast"], "--kernel"),
                        (["worker", "--family", str(measured), "--member", "tiny-p60", "--layout", "packed"], "--layout"),
                        (["serve", "--family", str(measured), "--worker-threads", "-1"], "--worker-threads")):
        done = _family(*args)
        assert done.returncode == 2 and done.stderr.strip().startswith("error:") and words in done.stderr
        assert "Traceback" not in done.stderr
