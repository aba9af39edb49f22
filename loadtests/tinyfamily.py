"""A tiny family for short-form load and reliability runs (CI): a 2-layer random Llama parent and two
truncated-SVD members, registered with sync_family, with accuracy and latency records so the router has
figures. The figures are test data (a random tiny model has no meaningful accuracy), shaped like a real
family: the parent most accurate and slowest, the smallest member least accurate and fastest.

    python -m loadtests.tinyfamily runs/tiny-family
"""

from __future__ import annotations

import sys
from pathlib import Path

NAME = "tiny"
DEVICE_CLASS = "test-cpu"
QUALITY = {"tiny-p100": 1.0, "tiny-p80": 0.9, "tiny-p60": 0.7}  # recorded as chat_agreement (what routing reads)
PERPLEXITY = {"tiny-p100": 20.0, "tiny-p80": 24.0, "tiny-p60": 35.0}
# ttft = a0 + a1·p + a2·p·(c−1) + a3·(c−1);  tpot = b0 + b1·(c−1) + b2·c·(p + o/2)   (family/latency.py)
LATENCY = {  # slower than the tiny models really are, so live correction stays inside the router's [0.1, 10] ratio
    "tiny-p100": {"a0": 0.200, "a1": 0.0004, "a2": 0.0, "a3": 0.040, "b0": 0.050, "b1": 0.010, "b2": 0.0},
    "tiny-p80": {"a0": 0.150, "a1": 0.0003, "a2": 0.0, "a3": 0.030, "b0": 0.040, "b1": 0.008, "b2": 0.0},
    "tiny-p60": {"a0": 0.100, "a1": 0.0002, "a2": 0.0, "a3": 0.020, "b0": 0.030, "b1": 0.006, "b2": 0.0},
}


def build_tiny_family(root: Path, device_class: str = DEVICE_CLASS, latency: dict[str, dict] | None = None) -> Path:
    """`latency` replaces the LATENCY table (the gateway tests use figures that separate the members more)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from family.registry import AccuracyRecord, LatencyProfile, load_family, sync_family
    from plrd.factorize import count_parameters, factorize
    from tests.conftest import make_tiny_parent

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    parent_dir = root / f"{NAME}-p100"
    make_tiny_parent(parent_dir)
    parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(parent_dir)
    for frac in (0.8, 0.6):
        member = factorize(parent, frac, count_parameters(parent), grams=None, allocation="uniform", progress=False)
        d = root / f"{NAME}-p{round(frac * 100)}"
        member.save_pretrained(d)
        tok.save_pretrained(d)
        (d / "provenance.json").write_text('{"method": "plain truncated SVD (loadtests.tinyfamily)"}')
    sync_family(root, parent_dir=parent_dir, family_name=NAME)
    fam = load_family(root)
    for m in fam.registry.members:
        m.accuracy += [AccuracyRecord(metric="perplexity", value=PERPLEXITY[m.name], data="test figures"),
                       AccuracyRecord(metric="chat_agreement", value=QUALITY[m.name], data="test figures"),
                       AccuracyRecord(metric="degenerate_answers", value=0.0, data="test figures", tokens=8)]
        m.latency[device_class] = LatencyProfile(device_class=device_class, engine="torch", latency_model=(latency or LATENCY)[m.name])
    fam.save()
    return root


if __name__ == "__main__":
    print(build_tiny_family(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-family")))
