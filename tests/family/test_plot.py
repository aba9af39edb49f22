"""The Pareto plot: a real PNG that image readers open, with or without measurements."""

from __future__ import annotations

import matplotlib.image as mpimg
import pytest
from PIL import Image

from family.plot import pareto_front, plot_family
from family.registry import AccuracyRecord, FamilyRegistry, LatencyProfile, LatencySample, MemberRecord

PNG = b"\x89PNG\r\n\x1a\n"


def _member(name, params, ppl=None, agree=None, tpot=None, parent=False):
    m = MemberRecord(name=name, path=name, architecture="LlamaForCausalLM", is_parent=parent, parameters=params,
                     bytes={"float32": 4 * params}, files={})
    if ppl is not None:
        m.accuracy.append(AccuracyRecord(metric="perplexity", value=ppl, data="t"))
    if agree is not None:
        m.accuracy.append(AccuracyRecord(metric="chat_agreement", value=agree, data="t"))
    if tpot is not None:
        m.latency["cpu-2core"] = LatencyProfile(device_class="cpu-2core", engine="torch", samples=[
            LatencySample(prompt_tokens=32, output_tokens=32, concurrency=1, ttft_s=0.1, tpot_s=tpot, e2e_s=1.0, throughput_tok_s=30.0)])
    return m


def _registry(members):
    return FamilyRegistry(name="fam", parent="fam-p100", members=members)


def test_pareto_front_keeps_only_non_dominated_points():
    pts = [(100, 20.0), (80, 25.0), (90, 30.0), (60, 40.0), (70, 22.0)]
    assert pareto_front(pts, lower_is_better=True) == [(60, 40.0), (70, 22.0), (100, 20.0)]
    assert pareto_front([(1, 0.5), (2, 0.4), (3, 0.9)], lower_is_better=False) == [(1, 0.5), (3, 0.9)]


@pytest.mark.parametrize("members", [
    [_member("fam-p100", 135_000_000, ppl=25.6, agree=1.0, tpot=0.03, parent=True),
     _member("fam-p80", 108_000_000, ppl=30.1, agree=0.8, tpot=0.025), _member("fam-p60", 81_000_000, ppl=45.0, agree=0.6)],
    [_member("fam-p100", 135_000_000, parent=True), _member("fam-p80", 108_000_000, agree=0.8)],  # quality only
    [_member("fam-p100", 135_000_000, parent=True)],  # nothing measured yet
], ids=["perplexity-and-latency", "quality-only", "unmeasured"])
def test_plot_writes_a_readable_png(members, tmp_path):
    out = plot_family(_registry(members), tmp_path / "sub" / "family.png")
    data = out.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    with Image.open(out) as img:
        img.verify()
    pixels = mpimg.imread(out)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 800
    assert pixels.std() > 0.01  # something was drawn
