"""Fitness (issue 10): the family's policy in family.json, which members it makes unfit and why, how it is
set, and how `family show` reports it. Registries here are written by hand (no model weights needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from family import defaults
from family.fit import members_fitting
from family.registry import (
    AccuracyRecord,
    FamilyRegistry,
    FitnessPolicy,
    MemberRecord,
    load_family,
    read_registry,
    registry_path,
    save_registry,
)


def _member(name: str, *, parent: bool = False, **metrics: float) -> MemberRecord:
    m = MemberRecord(name=name, path=name, architecture="LlamaForCausalLM", is_parent=parent, parameters=1000,
                     bytes={"float32": 4000, "bfloat16": 2000}, files={})
    for metric, value in metrics.items():
        m.accuracy.append(AccuracyRecord(metric=metric, value=value, data="chat.jsonl", tokens=8))
    return m


def _on_disk(root: Path, *members: MemberRecord, fitness: FitnessPolicy | None = None) -> Path:
    reg = FamilyRegistry(name="f", parent="f-p100", members=list(members), **({"fitness": fitness} if fitness else {}))
    for m in members:
        (root / m.path).mkdir(parents=True, exist_ok=True)
    save_registry(root, reg)
    return root


def test_the_default_policy():
    assert defaults.MIN_CHAT_AGREEMENT == 0.5
    assert FamilyRegistry(name="f", parent="f-p100").fitness == FitnessPolicy(min_chat_agreement=0.5, max_degenerate=0.0)


@pytest.mark.parametrize("field, value", [("min_chat_agreement", 1.5), ("max_degenerate", -0.1), ("surprise", 1)])
def test_a_policy_outside_its_range_is_refused(field, value):
    with pytest.raises(ValidationError):
        FitnessPolicy(**{field: value})


def test_an_older_family_json_without_a_policy_loads_with_the_defaults(tmp_path):
    _on_disk(tmp_path, _member("f-p100", parent=True), _member("f-p60", chat_agreement=0.3))
    data = json.loads(registry_path(tmp_path).read_text())
    del data["fitness"]
    registry_path(tmp_path).write_text(json.dumps(data))
    fam = load_family(tmp_path)
    assert fam.registry.fitness == FitnessPolicy()
    assert fam.unfit == {"f-p60": "chat agreement 0.300 < 0.5"}


@pytest.mark.parametrize("metrics, why", [
    ({}, None),  # not measured yet: not unfit (and it fits only budgets without min_accuracy)
    ({"chat_agreement": 0.5, "degenerate_answers": 0.0}, None),  # at the limits is fit
    ({"top1_agreement": 0.1}, None),  # plain-text agreement is not chat agreement
    ({"chat_agreement": 0.49}, "chat agreement 0.490 < 0.5"),
    ({"chat_agreement": 0.9, "degenerate_answers": 0.125}, "12% degenerate chat answers of 8 prompts (max 0%)"),
    ({"chat_agreement": 0.2, "degenerate_answers": 1.0},
     "100% degenerate chat answers of 8 prompts (max 0%); chat agreement 0.200 < 0.5"),
    # A member that loops only where the parent itself loops is the parent's model there: fit.
    ({"chat_agreement": 0.9, "degenerate_answers": 0.125, "degenerate_beyond_parent": 0.0}, None),
    ({"chat_agreement": 0.9, "degenerate_answers": 0.25, "degenerate_beyond_parent": 0.125},
     "12% degenerate chat answers where the parent's are not of 8 prompts (max 0%)"),
])
def test_unfit_reason_under_the_default_policy(metrics, why):
    assert _member("f-p60", **metrics).unfit_reason(FitnessPolicy()) == why


def test_the_parent_is_never_unfit_and_quality_is_chat_agreement_only():
    parent = _member("f-p100", parent=True, chat_agreement=0.1, degenerate_answers=0.5)
    assert parent.unfit_reason(FitnessPolicy()) is None and parent.quality == 1.0
    assert _member("f-p60", top1_agreement=0.8).quality is None
    assert _member("f-p60", top1_agreement=0.8, chat_agreement=0.6).quality == 0.6


def _at(m: MemberRecord, dtype: str, **metrics: float) -> MemberRecord:
    for metric, value in metrics.items():
        m.accuracy.append(AccuracyRecord(metric=metric, value=value, data="chat.jsonl", tokens=8, dtype=dtype))
    return m


def test_accuracy_is_read_at_the_dtype_the_member_is_served_at():
    m = _member("f-p80", chat_agreement=0.9)
    assert m.quality == 0.9 and m.quality_at("bfloat16") is None  # float32's figure never stands in for bfloat16's
    _at(m, "bfloat16", chat_agreement=0.85)
    assert m.quality == 0.9 and m.quality_at("bfloat16") == 0.85 and m.quality_at("float32") == 0.9
    parent = _member("f-p100", parent=True)
    assert parent.quality_at("float32") == 1.0 and parent.quality_at("bfloat16") is None  # rounded, it is not itself
    assert _at(parent, "bfloat16", chat_agreement=0.97).quality_at("bfloat16") == 0.97


def test_fitness_at_a_dtype_is_judged_on_its_figures_there_else_on_float32s():
    loops = _member("f-p60", chat_agreement=0.9, degenerate_answers=0.25)
    # Never evaluated at bfloat16: float32's verdict holds (a looping member must not become routable on a bf16 worker).
    assert loops.unfit_reason(FitnessPolicy(), "bfloat16") == "25% degenerate chat answers of 8 prompts (max 0%)"
    assert _at(loops, "bfloat16", chat_agreement=0.88, degenerate_answers=0.0).unfit_reason(FitnessPolicy(), "bfloat16") is None
    rounded = _at(_member("f-p80", chat_agreement=0.9, degenerate_answers=0.0), "bfloat16", chat_agreement=0.45, degenerate_answers=0.0)
    assert rounded.unfit_reason(FitnessPolicy()) is None
    assert rounded.unfit_reason(FitnessPolicy(), "bfloat16") == "chat agreement 0.450 at bfloat16 < 0.5"
    parent = _at(_member("f-p100", parent=True), "bfloat16", chat_agreement=0.4)
    assert parent.unfit_reason(FitnessPolicy()) is None and parent.unfit_reason(FitnessPolicy(), "bfloat16") == "chat agreement 0.400 at bfloat16 < 0.5"


def test_a_lenient_policy_keeps_a_member_a_strict_one_does_not():
    m = _member("f-p60", chat_agreement=0.6, degenerate_answers=0.125)
    assert m.unfit_reason(FitnessPolicy(min_chat_agreement=0.5, max_degenerate=0.25)) is None
    assert m.unfit_reason(FitnessPolicy(min_chat_agreement=0.7, max_degenerate=0.25)) == "chat agreement 0.600 < 0.7"


def test_unfit_lists_servable_members_only_and_members_fitting_leaves_them_out(tmp_path):
    _on_disk(tmp_path, _member("f-p100", parent=True), _member("f-p80", chat_agreement=0.3), _member("f-p60", chat_agreement=0.2),
             _member("f-p40", chat_agreement=0.9))
    (tmp_path / "f-p60").rmdir()  # f-p60 is not servable at all: a problem, not an unfit member
    fam = load_family(tmp_path)
    assert list(fam.problems) == ["f-p60"] and fam.unfit == {"f-p80": "chat agreement 0.300 < 0.5"}
    assert [m.name for m in members_fitting(fam, device_class="cpu")] == ["f-p100", "f-p40"]
    assert [m.name for m in members_fitting(fam, device_class="cpu", include_unfit=True)] == ["f-p100", "f-p40", "f-p80"]


def test_set_fitness_is_saved_under_the_lock_without_losing_another_writers_records(tmp_path):
    _on_disk(tmp_path, _member("f-p100", parent=True), _member("f-p60", chat_agreement=0.6))
    a, b = load_family(tmp_path), load_family(tmp_path)
    b.record("f-p60", accuracy=[AccuracyRecord(metric="degenerate_answers", value=0.25, data="chat.jsonl", tokens=8)])
    a.set_fitness(FitnessPolicy(min_chat_agreement=0.7, max_degenerate=0.5))
    reg = read_registry(tmp_path)
    assert reg.fitness == FitnessPolicy(min_chat_agreement=0.7, max_degenerate=0.5)
    assert reg.member("f-p60").metric("degenerate_answers") == 0.25  # b's record survived a's save
    assert a.registry == reg and a.unfit == {"f-p60": "chat agreement 0.600 < 0.7"}
    assert load_family(tmp_path).unfit == a.unfit  # the policy is what the next gateway start reads


def test_show_says_why_a_member_is_unfit(tmp_path, capsys):
    from family.cli import main

    sha = "ab" * 32
    parent = _member("f-p100", parent=True)
    parent.accuracy.append(AccuracyRecord(metric="perplexity", value=20.0, data="test.txt", data_sha256=sha))
    bad = _member("f-p60", chat_agreement=0.3, chat_kl=1.25, degenerate_answers=0.5)
    bad.accuracy.append(AccuracyRecord(metric="perplexity", value=30.0, data="test.txt", data_sha256=sha))
    good = _member("f-p80", chat_agreement=0.8, degenerate_answers=0.0)
    good.accuracy.append(AccuracyRecord(metric="perplexity", value=99.0, data="other.txt", data_sha256="cd" * 32))
    _on_disk(tmp_path, parent, good, bad)
    with pytest.raises(SystemExit) as done:
        main(["show", "--family", str(tmp_path)])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for column in ("chat agree", "chat KL", "degenerate", "ppl/parent"):
        assert column in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3 and "f-p" in line}
    assert "unfit: 50% degenerate chat answers" in rows["f-p60"] and "1.50" in rows["f-p60"]  # 30 / 20 on the same text
    assert "0.300" in rows["f-p60"] and "1.2500" in rows["f-p60"]
    assert "ok" in rows["f-p80"] and "unfit" not in rows["f-p80"] and "99.00" in rows["f-p80"]  # other text: no ratio
    assert "unfit" not in rows["f-p100"] and "1.00" in rows["f-p100"]
