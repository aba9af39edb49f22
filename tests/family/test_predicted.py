"""Device classes never profiled (issue 11): a latency profile predicted from the device's bandwidth and
the member's bytes, marked `predicted`, shown as such, and replaced by `family profile`'s measurement."""

from __future__ import annotations

import shutil

import pytest

from family import defaults
from family.bandwidth import measure_device
from family.devices import PUBLISHED, device_record, predict_profile
from family.latency import predict, predict_latency
from family.fit import members_fitting
from family.registry import load_family, read_registry
from tests.family.test_registry_api import build_tiny_family


@pytest.fixture(scope="module")
def tiny_family(tiny_parent_dir, tmp_path_factory):
    return build_tiny_family(tiny_parent_dir, tmp_path_factory.mktemp("pred") / "fam", fractions=(0.6,))


def _family(*args):
    """The `family` command in this process (torch is imported already: a fresh one costs seconds)."""
    from typer.testing import CliRunner

    from family.cli import _register, app

    _register()
    return CliRunner().invoke(app, list(args))


def test_prediction_follows_bandwidth_and_bytes(tiny_family):
    reg = read_registry(tiny_family)
    p100, p60 = reg.member("tiny-p100"), reg.member("tiny-p60")
    prof = p100.profile("h100")
    assert prof.basis == "predicted" and prof.engine == "predicted" and prof.dtype == "bfloat16"
    assert prof.samples == [] and "H100" in prof.command
    eff = defaults.PREDICTED_BANDWIDTH_EFFICIENCY
    weights = 2 * p100.parameters  # bf16
    assert prof.prediction.weight_bytes == weights and prof.prediction.device.bandwidth_bytes_s == 3.35e12
    assert prof.latency_model["b0"] == pytest.approx(weights / (3.35e12 * eff))  # one read of the weights per step
    assert prof.latency_model["b2"] == pytest.approx(2 * p100.kv_values_per_token / (3.35e12 * eff))  # KV per context token
    assert prof.latency_model["a1"] == pytest.approx(2 * p100.parameters / (989e12 * defaults.PREDICTED_COMPUTE_EFFICIENCY))
    # a member with fewer bytes decodes faster by its bytes ratio; on a faster device, faster by the bandwidth ratio
    tpot = lambda m, dc: predict_latency(m, dc, 32, 16).tpot_s  # noqa: E731
    ratio = p100.parameters / p60.parameters
    assert p100.profile("h100").latency_model["b0"] / p60.profile("h100").latency_model["b0"] == pytest.approx(ratio)
    assert 1 < tpot(p100, "h100") / tpot(p60, "h100") < ratio  # the KV cache (same for both) reads alike
    assert tpot(p100, "h100") / tpot(p100, "h200") == pytest.approx(4.8 / 3.35, rel=0.01)
    # memory: weights at the device's dtype + KV at the default batch and context, marked predicted
    mem = prof.memory
    assert mem.basis == "predicted" and mem.weights_bytes == weights and mem.runtime_bytes is None
    assert mem.member_bytes == weights + 2 * p100.kv_values_per_token * defaults.SERVING_BATCH * defaults.KV_CONTEXT
    assert p100.memory_bytes("h100") == mem.member_bytes
    assert p100.profile("t4").dtype == "float16"
    # a device class nobody knows: no prediction, as before
    assert p100.profile("tpu-v9") is None and predict_latency(p100, "tpu-v9", 32, 16) is None


def test_published_figures_name_their_source():
    assert PUBLISHED["h100"].bandwidth_bytes_s == 3.35e12 and PUBLISHED["h200"].bandwidth_bytes_s == 4.8e12
    for dev in PUBLISHED.values():
        assert dev.basis == "published" and "datasheet" in dev.source and dev.matmul_flops > 0


def test_a_measured_device_record_wins_over_the_datasheet(tiny_family):
    reg = read_registry(tiny_family)
    here = measure_device("h100", 8_000_000, threads=1, repeats=2)  # pretend this CPU is filed as h100
    assert device_record("h100", {"h100": here}) is here
    prof = predict_profile(reg.member("tiny-p100"), "h100", {"h100": here})
    assert prof.prediction.device.basis == "measured" and prof.dtype == "float32"
    assert prof.latency_model["b0"] == pytest.approx(4 * reg.member("tiny-p100").parameters / (here.bandwidth_bytes_s * defaults.PREDICTED_BANDWIDTH_EFFICIENCY))


def test_latency_budgets_route_on_predictions_where_never_profiled(tiny_family):
    reg = read_registry(tiny_family)
    p100, p60 = reg.member("tiny-p100"), reg.member("tiny-p60")
    assert not p100.latency and not p60.latency  # nothing measured anywhere
    e2e = {m.name: predict_latency(m, "l4", 32, 16).e2e_s * 1e3 for m in (p100, p60)}
    between = (e2e["tiny-p100"] + e2e["tiny-p60"]) / 2
    assert [m.name for m in members_fitting(reg, device_class="l4", max_latency_ms=between, prompt_tokens=32, output_tokens=16)] == ["tiny-p60"]
    assert members_fitting(reg, device_class="tpu-v9", max_latency_ms=1e9, prompt_tokens=32, output_tokens=16) == []


def test_profiling_replaces_the_prediction_and_show_marks_it(tiny_family, tmp_path):
    root = tmp_path / "fam"
    shutil.copytree(tiny_family, root)
    fam = load_family(root)
    fam.record_device(measure_device("test-cpu", 4_000_000, threads=1, repeats=2, command="test"))
    fam = load_family(root)
    before = fam.registry.member("tiny-p60").profile("test-cpu", fam.registry.devices)
    assert before.basis == "predicted" and before.prediction.device.basis == "measured"
    shown = _family("show", "--family", str(root), "--device-class", "h100")
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "tiny-p60" in line)
    assert row.count("~") >= 6  # TTFT, tok/s and memory on test-cpu and on h100: all predicted
    done = _family("profile", "--family", str(root), "--device-class", "test-cpu", "--member", "tiny-p60", "--concurrency", "1",
                   "--prompt-tokens", "8,16", "--output-tokens", "4", "--rounds", "1", "--kv-batch", "2", "--kv-context", "64")
    assert done.exit_code == 0, (done.output, done.exception)
    fam = load_family(root)
    after = fam.registry.member("tiny-p60").profile("test-cpu", fam.registry.devices)
    assert after.basis == "measured" and after.engine == "torch" and after.samples
    assert after.memory.basis == "measured" and after.memory.kv_batch == 2 and after.memory.kv_context == 64
    assert after.memory.runtime_shared_by == 2  # the family's two servable members, one engine process
    assert fam.registry.devices["test-cpu"].buffer_bytes == fam.registry.member("tiny-p100").bytes["float32"]  # re-measured: the parent's weights
    assert fam.registry.member("tiny-p100").profile("test-cpu", fam.registry.devices).basis == "predicted"  # not profiled yet
    pred = predict(after.latency_model, 16, 4)
    assert predict_latency(fam.registry.member("tiny-p60"), "test-cpu", 16, 4, 1, fam.registry.devices) == pred
    shown = _family("show", "--family", str(root))
    row = next(line for line in shown.output.splitlines() if line.lstrip("│ ").startswith("tiny-p60"))
    cells = [c.strip() for c in row.split("│")]
    assert not any(c.startswith("~") for c in cells[10:13]), cells  # test-cpu figures now measured
    assert "of roofline" in shown.output and "serving memory" in shown.output
