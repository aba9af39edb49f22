"""A tiny family on disk with registry figures for routing, and a fleet of real torch workers behind
the gateway, all over real HTTP on loopback (shared by the gateway, router and pool tests)."""

from __future__ import annotations

import contextlib

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from family.registry import AccuracyRecord, LatencyProfile, load_family, sync_family
from plrd.factorize import count_parameters, factorize
from server.fleet import WorkerSpec
from server.gateway import create_app
from server.worker_torch import create_app as create_worker
from tests.server.conftest import serve

DEVICE = "test-cpu"
# Registry figures for routing (test data; random tiny models have no meaningful accuracy of their
# own): the parent is the most accurate and the slowest, p60 the least accurate and the fastest.
QUALITY = {"tiny-p100": 1.0, "tiny-p80": 0.9, "tiny-p60": 0.7}
PERPLEXITY = {"tiny-p100": 20.0, "tiny-p80": 24.0, "tiny-p60": 35.0}
LATENCY = {
    "tiny-p100": {"a0": 0.400, "a1": 0.0, "a2": 0.0, "a3": 0.0, "b0": 0.040, "b1": 0.0, "b2": 0.0},
    "tiny-p80": {"a0": 0.150, "a1": 0.0, "a2": 0.0, "a3": 0.0, "b0": 0.020, "b1": 0.0, "b2": 0.0},
    "tiny-p60": {"a0": 0.030, "a1": 0.0, "a2": 0.0, "a3": 0.0, "b0": 0.005, "b1": 0.0, "b2": 0.0},
}


@pytest.fixture(scope="session")
def tiny_family(tiny_parent_dir, tmp_path_factory):
    """A tiny family on disk with measured accuracy (real eval) and a latency profile per member."""
    root = tmp_path_factory.mktemp("family")
    parent = AutoModelForCausalLM.from_pretrained(tiny_parent_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_parent_dir)
    (root / "tiny-p100").mkdir()
    parent.save_pretrained(root / "tiny-p100")
    tok.save_pretrained(root / "tiny-p100")
    for frac in (0.8, 0.6):
        member = factorize(parent, frac, count_parameters(parent), grams=None, allocation="uniform", progress=False)
        d = root / f"tiny-p{round(frac * 100)}"
        member.save_pretrained(d)
        tok.save_pretrained(d)
        (d / "provenance.json").write_text('{"method": "test"}')
    sync_family(root, parent_dir=root / "tiny-p100", family_name="tiny")
    fam = load_family(root)
    for m in fam.registry.members:
        m.accuracy += [AccuracyRecord(metric="perplexity", value=PERPLEXITY[m.name], data="test"),
                       AccuracyRecord(metric="top1_agreement", value=QUALITY[m.name], data="test")]
        m.latency[DEVICE] = LatencyProfile(device_class=DEVICE, engine="torch", latency_model=LATENCY[m.name])
    fam.save()
    return root


@contextlib.contextmanager
def fleet(family_root, members_workers: dict[str, int], worker_kwargs: dict | None = None, **gateway_kwargs):
    """Real torch workers (n per member) and the gateway in front of them."""
    fam = load_family(family_root)
    worker_kwargs = {"max_model_len": 256, "max_batch": 4, **(worker_kwargs or {})}
    with contextlib.ExitStack() as stack:
        specs = []
        for name, n in members_workers.items():
            for _ in range(n):
                url = stack.enter_context(serve(create_worker(fam.member_dir(name), name, **worker_kwargs)))
                specs.append(WorkerSpec(url=url, member=name, device_class=DEVICE))
        gw = stack.enter_context(serve(create_app(fam, specs, health_interval=0.3, **gateway_kwargs)))
        yield gw, openai.OpenAI(base_url=f"{gw}/v1", api_key="none", max_retries=0), specs
