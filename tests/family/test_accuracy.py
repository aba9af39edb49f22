"""Perplexity, agreement and KL on a tiny model, and `family eval` storing them in the registry."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from family import defaults
from family.data import read_prompts
from family.accuracy import agreement, evaluate, perplexity, windows
from family.errors import FamilyError
from family.registry import load_family, read_registry
from family.storage import sha256_file
from family.text import tokenize
from tests.family.test_registry_api import build_tiny_family

SEQ, WINDOWS = 64, 6


@pytest.fixture(scope="module")
def ids(tiny_parent_dir):
    tok = AutoTokenizer.from_pretrained(tiny_parent_dir)
    return tokenize(tok, defaults.EVAL_TEXT.read_text(encoding="utf-8")[:20_000])


@pytest.fixture(scope="module")
def models(tiny_parent_dir):
    from plrd.factorize import count_parameters, factorize

    parent = AutoModelForCausalLM.from_pretrained(tiny_parent_dir, dtype=torch.float32).eval()
    twin = AutoModelForCausalLM.from_pretrained(tiny_parent_dir, dtype=torch.float32).eval()  # same weights, other object
    member = factorize(parent, 0.5, count_parameters(parent), grams=None, allocation="uniform", progress=False).eval()
    return parent, twin, member


def test_perplexity_is_finite_and_matches_the_models_own_loss(models, ids):
    parent, _, _ = models
    ppl = perplexity(parent, ids, seq_len=SEQ, max_windows=WINDOWS, batch_size=4, progress=False)
    assert 1.0 < ppl < 1e6 and math.isfinite(ppl)
    # The same figure from transformers' loss (mean over the windows' shifted targets).
    rows = ids[: SEQ * WINDOWS].view(WINDOWS, SEQ)
    with torch.no_grad():
        loss = parent(input_ids=rows, labels=rows).loss.item()
    assert ppl == pytest.approx(math.exp(loss), rel=1e-4)
    # Batching does not change the figure.
    assert perplexity(parent, ids, seq_len=SEQ, max_windows=WINDOWS, batch_size=1, progress=False) == pytest.approx(ppl, rel=1e-5)


def test_parent_agrees_with_itself_and_a_truncated_member_does_not(models, ids):
    parent, twin, member = models
    top1, kl = agreement(parent, parent, ids, seq_len=SEQ, max_windows=WINDOWS, progress=False)
    assert top1 == 1.0 and kl == pytest.approx(0.0, abs=1e-6)
    top1, kl = agreement(parent, twin, ids, seq_len=SEQ, max_windows=WINDOWS, progress=False)  # computed, not short-cut
    assert top1 == 1.0 and kl == pytest.approx(0.0, abs=1e-5)
    top1, kl = agreement(parent, member, ids, seq_len=SEQ, max_windows=WINDOWS, progress=False)
    assert 0.0 <= top1 < 1.0 and kl > 1e-4


def test_evaluate_many_members_shares_the_parent_pass(models, ids):
    parent, _, member = models
    calls = {"n": 0}
    hook = parent.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        scores = evaluate({"p": parent, "m": member}, parent, ids, seq_len=SEQ, max_windows=WINDOWS, batch_size=3, progress=False)
    finally:
        hook.remove()
    assert calls["n"] == 2  # one parent forward per batch of windows (6 windows / 3), none extra for "p"
    assert scores["p"].top1_agreement == 1.0 and scores["p"].tokens == WINDOWS * (SEQ - 1)
    assert scores["m"].perplexity > scores["p"].perplexity * 0.5 and scores["m"].top1_agreement < 1.0


def test_too_little_text_is_an_error(models):
    with pytest.raises(FamilyError, match="not enough text"):
        perplexity(models[0], torch.arange(10), seq_len=SEQ, progress=False)


@pytest.fixture(scope="module")
def family_root(tiny_parent_dir, tmp_path_factory):
    return build_tiny_family(tiny_parent_dir, tmp_path_factory.mktemp("evalfam"), fractions=(0.6,))


def _cli(args):
    """Run `family ARGS` in-process (sys.argv as the shell would set it: the command is recorded)."""
    import sys
    from unittest import mock

    from family.cli import _register, app

    _register()
    with mock.patch.object(sys, "argv", ["family", *args]):
        return CliRunner().invoke(app, args)


def test_family_eval_stores_plausible_records(family_root):
    args = ["eval", "--family", str(family_root), "--windows", "4", "--seq-len", "64", "--batch-size", "2", "--answer-tokens", "8"]
    result = _cli(args)
    assert result.exit_code == 0, result.output
    reg = read_registry(family_root)
    p100, p60 = reg.member("tiny-p100"), reg.member("tiny-p60")
    # The routing accuracy is chat agreement with the parent's greedy answers to held-out chat prompts.
    assert p100.quality == 1.0 and p100.metric("chat_kl") == pytest.approx(0, abs=1e-6)
    assert p100.metric("degenerate_beyond_parent") == 0.0  # its degenerate answers, if any, are the parent's
    assert p60.metric("degenerate_beyond_parent") <= p60.metric("degenerate_answers")
    assert p100.metric("top1_agreement") == 1.0 and p100.metric("mean_kl") == pytest.approx(0, abs=1e-6)
    assert 0 <= p60.quality <= 1.0 and p60.metric("chat_kl") > 0 and p60.metric("mean_kl") > 0
    assert all(0 <= m.metric("degenerate_answers") <= 1 for m in (p100, p60))  # a random tiny model babbles: any share
    n_prompts = len(read_prompts(defaults.EVAL_PROMPTS))
    for m in (p100, p60):
        ppl = m.metric("perplexity")
        assert 1 < ppl < 1e6 and math.isfinite(ppl)
        assert {r.metric for r in m.accuracy} == {"perplexity", "top1_agreement", "mean_kl", "chat_agreement", "chat_kl", "degenerate_answers",
                                                  "degenerate_beyond_parent"}
        for r in m.accuracy:
            assert r.command.startswith("family ") and "--windows 4" in r.command
            if r.metric.startswith(("chat_", "degenerate_")):  # held-out chat prompts
                assert r.data == str(defaults.EVAL_PROMPTS) and r.data_sha256 == sha256_file(defaults.EVAL_PROMPTS)
                assert r.tokens == n_prompts if r.metric.startswith("degenerate_") else r.tokens >= n_prompts
            else:  # held-out plain text
                assert r.data == str(defaults.EVAL_TEXT) and r.data_sha256 == sha256_file(defaults.EVAL_TEXT)
                assert r.tokens == 4 * 63
    assert p60.latest("chat_agreement").reference == "tiny-p100"
    answers = json.loads((family_root / "eval" / "answers-tiny-p60.json").read_text())["answers"]
    assert len(answers) == n_prompts and all({"prompt", "answer", "degenerate"} <= set(a) for a in answers)
    # --skip-measured resumes: nothing is measured twice.
    again = _cli(args + ["--skip-measured"])
    assert again.exit_code == 0 and "already measured" in again.output
    assert len(read_registry(family_root).member("tiny-p60").accuracy) == 7
    # Without lm-eval (or its data) the tasks are skipped with the reason, never faked.
    lm = _cli(args + ["--member", "tiny-p60", "--lm-eval-tasks", "boolq", "--skip-measured"])
    assert lm.exit_code == 0
    assert "lm-eval" in lm.output and "skipped" in lm.output
    assert not any(r.metric.startswith("lm_eval:") for r in read_registry(family_root).member("tiny-p60").accuracy)


def test_family_eval_at_bfloat16_records_each_members_figures_at_that_dtype(family_root):
    """A worker serving bfloat16 is routed on what the members answer at bfloat16, the parent included:
    its answers are compared with the float32 parent's, so even the parent may score under 1.0."""
    args = ["eval", "--family", str(family_root), "--windows", "2", "--seq-len", "32", "--answer-tokens", "8"]
    assert _cli(args).exit_code == 0
    result = _cli(args + ["--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    reg = read_registry(family_root)
    p100, p60 = reg.member("tiny-p100"), reg.member("tiny-p60")
    for m in (p100, p60):
        low = [r for r in m.accuracy if r.dtype == "bfloat16"]
        assert {r.metric for r in low} >= {"chat_agreement", "chat_kl", "degenerate_answers", "degenerate_beyond_parent", "perplexity"}
        assert "--dtype bfloat16" in low[0].command
        assert m.metric("perplexity", "bfloat16") != m.metric("perplexity")  # measured again, not copied
    assert p100.quality == 1.0 and 0 < p100.quality_at("bfloat16") <= 1.0 and p100.metric("chat_kl", "bfloat16") > 0
    assert 0 <= p60.quality_at("bfloat16") <= 1.0
    assert json.loads((family_root / "eval" / "answers-tiny-p60-bfloat16.json").read_text())["dtype"] == "bfloat16"
    # Each dtype resumes on its own records.
    again = _cli(args + ["--dtype", "bfloat16", "--skip-measured"])
    assert again.exit_code == 0 and again.output.count("already measured") == 2
    bad = _cli(args + ["--dtype", "int4"])
    assert bad.exit_code != 0 and "--dtype must be float32, bfloat16 or float16" in str(bad.exception)


def test_interrupted_eval_keeps_what_was_measured(tiny_parent_dir, tmp_path, monkeypatch):
    root = build_tiny_family(tiny_parent_dir, tmp_path / "fam", fractions=(0.8, 0.6))
    import family.accuracy

    real, seen = family.accuracy.evaluate, []

    def flaky(members, *a, **kw):
        seen.append(next(iter(members)))
        if len(seen) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third member
        return real(members, *a, **kw)

    monkeypatch.setattr(family.accuracy, "evaluate", flaky)
    result = _cli(["eval", "--family", str(root), "--windows", "2", "--seq-len", "32"])
    assert result.exit_code != 0
    reg = read_registry(root)
    done = [m.name for m in reg.members if m.metric("perplexity") is not None]
    assert seen[0] == "tiny-p100" and done == seen[:2]  # parent first, then one member, both saved
    assert reg.member(seen[2]).accuracy == []


def test_eval_errors_are_family_errors(family_root):
    result = _cli(["eval", "--family", str(family_root), "--member", "nope"])
    assert isinstance(result.exception, FamilyError) and "no member named 'nope'" in str(result.exception)
    short = family_root / "short.txt"
    short.write_text("a few words only")
    result = _cli(["eval", "--family", str(family_root), "--data", str(short)])
    assert isinstance(result.exception, FamilyError) and "not enough text" in str(result.exception)
    assert load_family(family_root).problems == {}


class Constant(torch.nn.Module):
    """A 'model' whose next-token distribution is fixed: `logits` at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    ids = torch.randint(0, 50, (5000,))
    assert perplexity(Constant(torch.zeros(50)), ids, seq_len=64, max_windows=10, progress=False) == pytest.approx(50, rel=1e-5)


def test_perplexity_counts_only_the_first_windows():
    # Windows 0-1 hold only token 0; later text only token 1. A model sure of token 0 scores 1 there.
    ids = torch.cat([torch.zeros(128, dtype=torch.long), torch.ones(1000, dtype=torch.long)])
    sure = Constant(torch.tensor([20.0, -20.0]))
    assert perplexity(sure, ids, seq_len=64, max_windows=2, batch_size=1, progress=False) == pytest.approx(1.0, abs=1e-6)
    assert perplexity(sure, ids, seq_len=64, max_windows=4, progress=False) > math.e ** 10


def test_windows_are_the_first_n_in_order():
    ids = torch.arange(1000)
    w = windows(ids, 100, 3)
    assert w.shape == (3, 100) and torch.equal(w.flatten(), ids[:300])
    assert windows(ids, 300, None).shape == (3, 300)
    with pytest.raises(FamilyError, match="not enough text"):
        windows(ids[:10], 100, 3)


def test_perplexity_in_parent_tokens_is_the_parents_perplexity_when_the_tokens_are_the_same(models, ids, tiny_parent_dir):
    from family.accuracy import perplexity_in_parent_tokens

    parent = models[0]
    tok = AutoTokenizer.from_pretrained(tiny_parent_dir)
    rows = windows(ids, SEQ, WINDOWS)
    own = perplexity_in_parent_tokens(parent, tok, tok, rows, progress=False)
    assert own.perplexity == pytest.approx(perplexity(parent, ids, seq_len=SEQ, max_windows=WINDOWS, progress=False), rel=1e-3)
    assert own.tokens == WINDOWS * (SEQ - 1) and own.top1_agreement is None


def test_family_eval_scores_a_trimmed_vocabulary_member_in_its_own_tokens(tiny_parent_dir, tmp_path):
    """A member that keeps some of the parent's tokens, renumbered: chat scored on the parent's answers
    re-encoded in its tokens, perplexity per parent token on the same text (comparable with the parent's)."""
    import copy

    from family.registry import sync_family
    from plrd.vocab import choose_vocabulary, trim_model, trim_tokenizer

    root = build_tiny_family(tiny_parent_dir, tmp_path / "fam", fractions=())
    parent = AutoModelForCausalLM.from_pretrained(tiny_parent_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_parent_dir)
    d = root / "tiny-p97"
    keep = choose_vocabulary(tok, torch.arange(len(tok), dtype=torch.float64), 320)  # the last merges first: ids move
    trim_model(copy.deepcopy(parent), keep).save_pretrained(d)
    trim_tokenizer(tok, keep).save_pretrained(d)
    (d / "provenance.json").write_text(json.dumps({"method": "vocabulary-trim", "target": 0.97, "derived_from": "tiny-p100"}))
    sync_family(root, parent_dir=root / "tiny-p100", family_name="tiny")
    result = _cli(["eval", "--family", str(root), "--windows", "4", "--seq-len", "64", "--answer-tokens", "8"])
    assert result.exit_code == 0, result.output
    reg = read_registry(root)
    trimmed, p100 = reg.member("tiny-p97"), reg.member("tiny-p100")
    assert {r.metric for r in trimmed.accuracy} == {"perplexity", "chat_agreement", "chat_kl", "degenerate_answers", "degenerate_beyond_parent"}
    assert trimmed.latest("perplexity").tokens == p100.latest("perplexity").tokens == 4 * 63  # the parent's positions
    assert 0.0 <= trimmed.quality <= 1.0 and trimmed.metric("chat_kl") >= 0
    assert math.isfinite(trimmed.metric("perplexity"))
