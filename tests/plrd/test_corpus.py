"""The parent's distillation corpus: made from shipped prompts, deterministic for a seed, cached, resumable."""

import json

import pytest

from family import data as shipped
from family.storage import sha256_file
from plrd.corpus import CORPUS_FILE, META_FILE, CorpusConfig, make_corpus

CFG = CorpusConfig(max_new_tokens=8, text_tokens=6, batch_size=3, max_prompts=5, max_openers=2, dtype="float32")


def _make(tiny, tiny_parent_dir, runs, cfg=CFG):
    model, tok = tiny
    return make_corpus(model, tok, tiny_parent_dir, runs, cfg, progress=False)


def test_shipped_prompt_files_are_valid_and_disjoint():
    seeds = {p.prompt.lower() for p in shipped.read_prompts(shipped.SEED_PROMPTS)}
    held_out = {p.prompt.lower() for p in shipped.read_prompts(shipped.EVAL_PROMPTS)}
    assert len(seeds) >= 400 and len(held_out) >= 40
    assert not seeds & held_out, "held-out chat prompts must never be used for healing"
    assert len(shipped.read_lines(shipped.TEXT_OPENERS)) >= 100


def test_corpus_has_chat_answers_and_text_continuations(tiny, tiny_parent_dir, tmp_path):
    corpus = _make(tiny, tiny_parent_dir, tmp_path)
    kinds = [r["kind"] for r in corpus.records]
    assert kinds.count("chat") == 5 and kinds.count("text") == 2
    _, tok = tiny
    for r in corpus.records:
        assert r["ids"][: r["prompt_len"]] and len(r["ids"]) > r["prompt_len"]  # the prompt, then what the parent said
        if r["kind"] == "chat":  # through the parent's own chat template
            assert tok.decode(r["ids"][: r["prompt_len"]]).endswith("<|im_start|>assistant\n")
    assert corpus.meta["complete"] and corpus.meta["sha256"] == sha256_file(corpus.folder / CORPUS_FILE)
    assert corpus.tokens == corpus.token_ids().numel() == corpus.meta["tokens"]


def test_same_seed_same_corpus_other_seed_other_corpus(tiny, tiny_parent_dir, tmp_path):
    a = _make(tiny, tiny_parent_dir, tmp_path / "a")
    b = _make(tiny, tiny_parent_dir, tmp_path / "b")
    c = _make(tiny, tiny_parent_dir, tmp_path / "c", CorpusConfig(**{**CFG.__dict__, "seed": 1}))
    assert a.meta["sha256"] == b.meta["sha256"]
    assert a.folder.name == b.folder.name != c.folder.name  # the cache key includes the seed
    assert [r["ids"] for r in a.records] != [r["ids"] for r in c.records]


def test_a_complete_corpus_is_read_from_the_cache(tiny, tiny_parent_dir, tmp_path, monkeypatch):
    first = _make(tiny, tiny_parent_dir, tmp_path)
    import plrd.corpus

    def fail(*a, **k):
        raise AssertionError("generated again although the cache was complete")

    monkeypatch.setattr(plrd.corpus, "generate", fail)
    again = _make(tiny, tiny_parent_dir, tmp_path)
    assert again.meta["sha256"] == first.meta["sha256"] and again.records == first.records


def test_an_interrupted_corpus_resumes_to_the_same_result(tiny, tiny_parent_dir, tmp_path):
    full = _make(tiny, tiny_parent_dir, tmp_path / "full")
    part = _make(tiny, tiny_parent_dir, tmp_path / "part")
    path = part.folder / CORPUS_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4]) + lines[4][:10])  # one whole batch, a partial one, a torn line
    (part.folder / META_FILE).unlink()
    resumed = _make(tiny, tiny_parent_dir, tmp_path / "part")
    assert resumed.meta["sha256"] == full.meta["sha256"]
    assert json.loads((part.folder / META_FILE).read_text())["records"] == len(full.records)


@pytest.mark.parametrize("bad", ["", "{\"category\": \"x\"}\n"])
def test_a_bad_prompt_file_is_one_clear_error(tiny, tiny_parent_dir, tmp_path, bad):
    from family.errors import FamilyError

    path = tmp_path / "prompts.jsonl"
    path.write_text(bad)
    model, tok = tiny
    with pytest.raises(FamilyError, match="prompt"):
        make_corpus(model, tok, tiny_parent_dir, tmp_path, CFG, prompts_path=path, progress=False)
