"""`family build`: members on disk that transformers loads alone, registered, resumable, with clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import plrd.build
from family import defaults
from family.errors import FamilyError
from family.registry import load_family
from plrd.build import BuildConfig, build_family, parse_vocab_sizes, vocab_sizes
from plrd.heal import HealConfig


def _config(parent, out, targets=(0.8, 0.6), heal_tokens=2048):
    return BuildConfig(
        parent=parent, targets=list(targets), calib=str(defaults.WIKITEXT_VALID), out=out, name="tiny",
        heal=HealConfig(tokens=heal_tokens, seq_len=64, batch_size=2, grad_accum=1), method="whitened", calib_sequences=8,
        calib_seq_len=128, command="test",
    )


@pytest.fixture(scope="module")
def built(tiny_parent_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("family")
    return out, build_family(_config(tiny_parent_dir, out), progress=False)


def test_build_writes_registered_members_that_transformers_loads_alone(built):
    out, members = built
    assert [m.name for m in members] == ["tiny-p80", "tiny-p60"]
    family = load_family(out, verify="full")
    assert family.problems == {}
    assert family.registry.names() == ["tiny-p100", "tiny-p80", "tiny-p60"]
    p80 = family.registry.member("tiny-p80")
    assert p80.derived_from == "tiny-p100" and family.registry.member("tiny-p60").derived_from == "tiny-p80"
    parent = family.registry.member("tiny-p100")
    assert abs(p80.parameters / parent.parameters - 0.8) <= 0.008

    # A fresh interpreter with only transformers + the package import: load and generate.
    code = (
        "import family, sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(members[1])!r}); t = AutoTokenizer.from_pretrained({str(members[1])!r});"
        "ids = t('The tower is', return_tensors='pt'); out = m.generate(**ids, max_new_tokens=5, do_sample=False);"
        "print(type(m).__name__, out.shape[1] - ids['input_ids'].shape[1])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["LowRankLlamaForCausalLM", "5"]


def test_provenance_records_how_each_member_was_made(built):
    _, members = built
    prov = json.loads((members[0] / "provenance.json").read_text())
    assert prov["method"] == "plrd-whitened-svd" and prov["target"] == 0.8
    assert prov["calibration"]["sha256"] and prov["healing"]["tokens"] >= 2048
    assert prov["derived_from"] == "tiny-p100"
    assert prov["final_heal_loss"] > 0 and len(prov["healing"]["loss_curve"]) >= 1
    assert prov["distillation"] is None and prov["command"] == "test" and prov["wall_s"] > 0
    assert prov["on_policy"] is None  # not asked for
    assert json.loads((members[1] / "provenance.json").read_text())["derived_from"] == "tiny-p80"


def test_an_interrupted_build_resumes_without_redoing_finished_members(tiny_parent_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_heal = plrd.build.heal

    def heal_that_crashes_on_the_second_member(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_heal(*args, **kwargs)

    monkeypatch.setattr(plrd.build, "heal", heal_that_crashes_on_the_second_member)
    with pytest.raises(KeyboardInterrupt):
        build_family(_config(tiny_parent_dir, tmp_path), progress=False)
    first = tmp_path / "tiny-p80"
    assert (first / "provenance.json").is_file()
    assert not (tmp_path / "tiny-p60").exists()
    assert not list(tmp_path.glob(".tiny-p60*"))  # no half-written member left behind
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(plrd.build, "heal", real_heal)
    build_family(_config(tiny_parent_dir, tmp_path), progress=False)
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert (tmp_path / "tiny-p60" / "provenance.json").is_file()


def test_the_family_name_defaults_to_the_parent_folder_name():
    from plrd.build import default_family_name

    assert default_family_name("runs/parent-smollm2-135m") == "smollm2-135m"
    assert default_family_name("/m/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct.q4_1"
    assert default_family_name("HuggingFaceTB/SmolLM2-360M") == "smollm2-360m"


def _family(*args):
    return subprocess.run([sys.executable, "-m", "family.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--parent", "/no/such/model"], "parent not found"),
        (["--targets", "0.8,0.9"], "strictly decreasing"),
        (["--targets", "0.8,abc"], "comma-separated fractions"),
        (["--targets", "1.2"], "out of range"),
        (["--calib", "/no/such.txt"], "data file not found"),
        (["--method", "qr"], "--method"),
        (["--heal-tokens", "-5"], "--heal-tokens"),
    ],
)
def test_cli_bad_input_is_one_line_and_a_nonzero_exit(tiny_parent_dir, tmp_path, args, words):
    base = {"--parent": str(tiny_parent_dir), "--out": str(tmp_path / "f"), "--targets": "0.8"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    done = _family("build", *[x for kv in base.items() for x in kv])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and words in lines[-1]
    assert "Traceback" not in done.stderr


def test_an_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(FamilyError, match="not supported"):
        build_family(_config(tmp_path / "gpt2", tmp_path / "out"), progress=False)


def test_the_cli_builds_a_distilled_member_named_after_the_parent_folder(tiny_parent_dir, tmp_path):
    from typer.testing import CliRunner

    from family.cli import _register, app

    _register()
    args = [
        "build", "--parent", str(tiny_parent_dir), "--targets", "0.8", "--out", str(tmp_path), "--heal-tokens", "512",
        "--seq-len", "64", "--batch-size", "2", "--grad-accum", "1", "--calib-sequences", "4", "--calib-seq-len", "64",
        "--distill", "--distill-weight", "0.3", "--temperature", "2", "--calib", str(defaults.WIKITEXT_VALID),
        "--on-policy-tokens", "256", "--corpus-answer-tokens", "16",
    ]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    family_name = tiny_parent_dir.name.removeprefix("parent-").lower()
    prov = json.loads((tmp_path / f"{family_name}-p80" / "provenance.json").read_text())
    assert prov["distillation"] == {"teacher": f"{family_name}-p100", "weight": 0.3, "temperature": 2.0}
    assert prov["healing"]["distill_weight"] == 0.3 and prov["final_heal_loss"] > 0
    on_policy = prov["on_policy"]  # then distilled on its own answers, graded by the parent
    assert on_policy["tokens"] == 256 and on_policy["rounds"] >= 1 and on_policy["teacher"] == f"{family_name}-p100"
    assert on_policy["final_kl"] > 0 and on_policy["max_new_tokens"] == 16


def test_build_needs_no_shared_data_its_default_data_is_the_parents_own(tiny_parent_dir, tmp_path):
    """A user's fresh clone has no ../shared: the default build makes its corpus from the parent."""
    import os

    env = {**os.environ, "FAMILY_SHARED_DATA": str(tmp_path / "does-not-exist"), "FAMILY_RUNS_DIR": str(tmp_path / "runs")}
    args = ["build", "--parent", str(tiny_parent_dir), "--targets", "0.8", "--out", str(tmp_path / "fam"), "--heal-tokens", "256",
            "--corpus-prompts", "6", "--corpus-answer-tokens", "8", "--calib-sequences", "4", "--seq-len", "32", "--batch-size", "2",
            "--grad-accum", "1"]
    done = subprocess.run([sys.executable, "-m", "family.cli", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    prov = json.loads((tmp_path / "fam" / f"{tiny_parent_dir.name.lower()}-p80" / "provenance.json").read_text())
    assert prov["calibration"]["source"] == "parent" and prov["init"]["method"] == "refit"
    assert prov["distillation"]["weight"] == 1.0  # distilled from the parent by default
    [corpus] = (tmp_path / "runs").glob("corpus-*")
    assert prov["healing_data"]["corpus"] == str(corpus) and (corpus / "meta.json").is_file()


def test_a_trimmed_vocabulary_is_every_members_own_and_alone_can_make_the_first_member(tiny_parent_dir, tmp_path):
    """--vocab-size: every member keeps the N tokens the parent uses most (its tokenizer saved with it).
    A target that the vocabulary cut alone reaches is the parent's logits on those tokens: not pruned,
    refit or distilled; later members are cut in width from it, in the same vocabulary, refit and
    distilled on the parent's corpus re-encoded in it."""
    from plrd.corpus import CorpusConfig

    size = 320
    cfg = BuildConfig(
        parent=tiny_parent_dir, targets=[0.97, 0.8], calib=defaults.CALIB_PARENT, out=tmp_path / "fam", name="tiny",
        heal=HealConfig(tokens=256, seq_len=32, batch_size=2, grad_accum=1, distill_weight=1.0), method="width",
        calib_sequences=4, calib_seq_len=32, corpus=CorpusConfig(max_prompts=6, max_new_tokens=8, max_openers=4),
        runs_dir=tmp_path / "runs", vocab_size=size, command="test",
    )
    p97, p80 = build_family(cfg, progress=False)
    for folder in (p97, p80):
        model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        assert model.config.vocab_size == len(tok) == size
        assert max(tok("The tower is tall and old.")["input_ids"]) < size
    first, second = (json.loads((f / "provenance.json").read_text()) for f in (p97, p80))
    assert first["method"] == "vocabulary-trim" and first["init"] is None and first["vocabulary"]["size"] == size
    assert first["healing"]["steps"] == 0 and first["final_heal_loss"] is None  # nothing cut inside: nothing to heal
    assert second["final_heal_loss"] > 0  # distilled from the parent, its distribution folded onto the kept ids
    assert second["method"] == "width-pruning" and second["init"]["method"] == "refit" and second["vocabulary"]["size"] == size
    assert abs(second["achieved_fraction"] - 0.8) < 0.01
    assert load_family(tmp_path / "fam", verify="full").problems == {}


def test_each_member_can_keep_fewer_tokens_a_subset_of_the_previous_members(tiny_parent_dir, tmp_path):
    """--vocab-size N1,N2: one size per target. A smaller member speaks a subset of the vocabulary of
    the member it is cut from, its tied embedding those rows of that member's."""
    from plrd.corpus import CorpusConfig

    cfg = BuildConfig(
        parent=tiny_parent_dir, targets=[0.97, 0.8], calib=defaults.CALIB_PARENT, out=tmp_path / "fam", name="tiny",
        heal=HealConfig(tokens=128, seq_len=32, batch_size=2, grad_accum=1, distill_weight=1.0), method="width",
        calib_sequences=4, calib_seq_len=32, corpus=CorpusConfig(max_prompts=6, max_new_tokens=8, max_openers=4),
        runs_dir=tmp_path / "runs", vocab_size=(320, 300), command="test",
    )
    p97, p80 = build_family(cfg, progress=False)
    big, small = AutoTokenizer.from_pretrained(p97), AutoTokenizer.from_pretrained(p80)
    assert len(big) == 320 and len(small) == AutoModelForCausalLM.from_pretrained(p80).config.vocab_size == 300
    assert set(small.get_vocab()) < set(big.get_vocab())
    second = json.loads((p80 / "provenance.json").read_text())
    assert second["vocabulary"]["size"] == 300 and second["method"] == "width-pruning" and abs(second["achieved_fraction"] - 0.8) < 0.01
    assert load_family(tmp_path / "fam", verify="full").problems == {}
    # Resumed with the same sizes, nothing is redone; with other sizes, a finished member is not silently changed.
    assert build_family(cfg, progress=False) == [p97, p80]
    cfg.vocab_size = (320, 310)
    with pytest.raises(FamilyError, match="vocabulary of 300 tokens, not --vocab-size 310"):
        build_family(cfg, progress=False)


def test_vocabulary_sizes_are_one_for_all_or_one_per_target_and_never_grow():
    assert parse_vocab_sizes("24576") == 24576 and parse_vocab_sizes("0") is None
    assert parse_vocab_sizes("24576,16384,16384") == (24576, 16384, 16384)
    assert vocab_sizes(24576, [0.9, 0.8], 49152) == [24576, 24576]
    assert vocab_sizes(None, [0.9, 0.8], 49152) == [49152, 49152]
    assert vocab_sizes((0, 16384), [0.9, 0.8], 49152) == [49152, 16384]  # the first member keeps the parent's
    with pytest.raises(FamilyError, match="one per target"):
        vocab_sizes((24576, 16384), [0.9, 0.8, 0.7], 49152)
    with pytest.raises(FamilyError, match="must not grow"):
        vocab_sizes((16384, 24576), [0.9, 0.8], 49152)
    with pytest.raises(FamilyError, match="whole number"):
        parse_vocab_sizes("24k")


def test_on_policy_distillation_is_refused_with_a_trimmed_vocabulary(tiny_parent_dir, tmp_path):
    from plrd.onpolicy import OnPolicyConfig

    cfg = _config(tiny_parent_dir, tmp_path)
    cfg.vocab_size, cfg.on_policy = 320, OnPolicyConfig(tokens=64)
    with pytest.raises(FamilyError, match="vocab-size 0"):
        build_family(cfg, progress=False)
