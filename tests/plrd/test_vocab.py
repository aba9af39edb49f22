"""Vocabulary trimming keeps a closed set of the parent's BPE tokens (the ones it uses most, or its first
merges), renumbered in the parent's order: the parent's own logits on them, read in the parent's ids."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from family import chat_eval
from family.errors import FamilyError
from family.vocab_map import VocabMap
from plrd.heal import distill_kl
from plrd.refit import sequential_refit
from plrd.vocab import _merge_tree, choose_vocabulary, first_ids, most_used_vocabulary, reencode, teacher_logprobs, token_usage, trim_model, trim_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog, and the capital of Japan is Tokyo. Ünïcödé too."


def _used_most(tok, size):
    """A vocabulary that prefers the last ids (the rarest merges): it drops early ids, so ids move."""
    return choose_vocabulary(tok, torch.arange(len(tok), dtype=torch.float64), size)


def test_trimmed_tokenizer_spells_every_text_with_kept_ids(tiny):
    _, tok = tiny
    size = len(tok) - 64
    full_ids = tok(TEXT)["input_ids"]
    for keep in (first_ids(size), _used_most(tok, size)):
        small = trim_tokenizer(tok, keep)
        ids = small(TEXT)["input_ids"]
        assert max(ids) < size and len(small.get_vocab()) == size
        assert len(ids) >= len(full_ids)  # removed words now take pieces
        assert small.decode(ids) == tok.decode(full_ids) == TEXT
    assert tok(TEXT)["input_ids"] == full_ids and len(tok) == size + 64  # the parent's tokenizer is untouched


def test_the_chosen_vocabulary_is_closed_keeps_the_specials_and_prefers_what_the_parent_uses(tiny):
    _, tok = tiny
    vocab, parts_of = _merge_tree(tok)
    usage = torch.zeros(len(tok), dtype=torch.float64)
    favourite = max(vocab[t] for t in parts_of)  # the last merge: never among the first ids
    usage[favourite] = 1.0
    size = len(tok) - 64
    keep = choose_vocabulary(tok, usage, size)
    assert len(keep) == size and keep == sorted(keep) and favourite in keep
    kept = {t for t, i in vocab.items() if i in set(keep)}
    assert all(set(parts_of[t]) <= kept for t in kept if t in parts_of)  # every kept merge can still be made
    assert all(t in kept for t in vocab if t not in parts_of)  # base tokens: every text stays encodable
    assert set(tok.all_special_ids) <= set(keep)
    small = trim_tokenizer(tok, keep)
    assert [small.convert_tokens_to_ids(t) for t in tok.all_special_tokens] == tok.all_special_ids  # specials keep their ids


def test_trimmed_model_is_the_parents_logits_on_the_kept_ids(tiny):
    model, tok = tiny
    keep = _used_most(tok, len(tok) - 64)
    member = trim_model(copy.deepcopy(model), keep)
    vocab = VocabMap.between(tok, trim_tokenizer(tok, keep))
    ids = torch.tensor([trim_tokenizer(tok, keep)(TEXT)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(member(input_ids=ids).logits, model(input_ids=vocab.parent_ids(ids)).logits[..., keep])
    assert member.config.vocab_size == len(keep) and member.lm_head.weight is member.get_input_embeddings().weight


def test_fold_sends_a_removed_token_to_the_first_piece_of_its_spelling(tiny):
    _, tok = tiny
    keep = _used_most(tok, len(tok) - 64)
    small = trim_tokenizer(tok, keep)
    vocab = VocabMap.between(tok, small)
    assert torch.equal(vocab.to_parent, torch.tensor(keep))
    assert torch.equal(vocab.fold[vocab.to_parent], torch.arange(len(keep)))  # a kept token lands on itself
    removed = next(i for i in range(len(tok)) if i not in set(keep))
    assert vocab.fold[removed].item() == small(tok.decode([removed]), add_special_tokens=False)["input_ids"][0]
    folded = vocab.fold_logprobs(torch.log_softmax(torch.randn(3, len(tok)), -1))
    assert folded.shape == (3, len(keep)) and torch.allclose(folded.exp().sum(-1), torch.ones(3))


def test_chat_kl_of_a_trimmed_member_is_to_the_parent_reading_the_same_tokens(tiny):
    model, tok = tiny
    prompts = ["What is the capital of Japan?", "Name three colours."]
    ref = chat_eval.reference(model, tok, prompts, max_new_tokens=12, progress=False)
    whole = VocabMap.between(tok, tok)
    same = chat_eval.score(copy.deepcopy(model), model, tok, chat_eval.in_tokens_of(ref, tok, tok), vocab=whole, progress=False)
    assert same.kl == pytest.approx(0.0, abs=1e-5)
    keep = _used_most(tok, len(tok) - 64)
    small = trim_tokenizer(tok, keep)
    member, vocab, member_ref = trim_model(copy.deepcopy(model), keep), VocabMap.between(tok, small), chat_eval.in_tokens_of(ref, tok, small)
    got = chat_eval.score(member, model, small, member_ref, vocab=vocab, progress=False)
    kl, n = 0.0, 0
    with torch.no_grad():  # what it must be: the parent on the same tokens in its ids, folded, against the member
        for p, a in zip(member_ref.prompt_ids, member_ref.answers):
            ids = torch.tensor([p + a])
            mine = F.log_softmax(member(input_ids=ids).logits[0, len(p) - 1 : -1], -1)
            theirs = vocab.fold_logprobs(F.log_softmax(model(input_ids=vocab.parent_ids(ids)).logits[0, len(p) - 1 : -1], -1))
            kl += F.kl_div(mine, theirs, log_target=True, reduction="sum").item()
    n = sum(len(a) for a in ref.answers)  # per token of the parent's answers, as for an untrimmed member
    assert got.tokens == n and got.kl == pytest.approx(kl / n, rel=1e-4) and got.kl < 1.0


def test_refit_leaves_a_trimmed_parent_as_it_is(tiny, calib_rows):
    # The parent reads the member's rows in its own ids: the same inputs everywhere, nothing to fix.
    parent, tok = tiny
    keep = _used_most(tok, len(tok) - 64)
    vocab = VocabMap.between(tok, trim_tokenizer(tok, keep))
    member = trim_model(copy.deepcopy(parent), keep)
    rows = vocab.fold[calib_rows]  # calibration text in the member's ids (kept tokens; removed ones as a piece)
    sequential_refit(parent, member, rows, vocab=vocab, damping=1e-3, progress=False)
    for (name, a), b in zip(parent.model.layers.named_parameters(), member.model.layers.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_token_usage_is_the_expected_count_of_each_token(tiny, calib_rows):
    model, _ = tiny
    usage = token_usage(model, calib_rows[:3], batch_size=2, progress=False)
    assert usage.shape == (model.config.vocab_size,) and usage.sum().item() == pytest.approx(calib_rows[:3].numel(), rel=1e-6)


def test_refuses_what_would_not_be_the_parents_vocabulary(tiny):
    _, tok = tiny
    with pytest.raises(FamilyError, match="past the tokenizer"):
        choose_vocabulary(tok, torch.zeros(len(tok)), len(tok) + 1)
    with pytest.raises(FamilyError, match="base tokens"):
        choose_vocabulary(tok, torch.zeros(len(tok)), 2)
    with pytest.raises(FamilyError, match="special token"):
        trim_tokenizer(tok, list(range(1, len(tok))))
    vocab, parts_of = _merge_tree(tok)
    product = next(iter(parts_of))
    with pytest.raises(FamilyError, match="not a closed vocabulary"):  # a merge whose product is kept but not its parts
        trim_tokenizer(tok, sorted(set(first_ids(len(tok) - 64)) - {vocab[parts_of[product][0]]} | {vocab[product]}))
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab, first = spec["model"]["vocab"], spec["model"]["merges"][0]
    product = "".join(first) if isinstance(first, list) else first.replace(" ", "")
    last = max(vocab, key=vocab.get)
    vocab[product], vocab[last] = vocab[last], vocab[product]  # the first merge's product now has the last id
    shuffled = copy.deepcopy(tok)
    shuffled._tokenizer = Tokenizer.from_str(json.dumps(spec))
    with pytest.raises(FamilyError, match="not a closed vocabulary"):  # its first ids are not a closed vocabulary
        trim_tokenizer(shuffled, first_ids(len(tok) - 1))
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["decoder"] = {"type": "BPEDecoder", "suffix": ""}  # not byte-level: token strings are not one symbol per byte
    other = copy.deepcopy(tok)
    other._tokenizer = Tokenizer.from_str(json.dumps(spec))
    with pytest.raises(FamilyError, match="byte-level BPE"):
        trim_tokenizer(other, first_ids(len(tok) - 64))


def test_the_parents_sequences_reencoded_say_the_same_text_in_kept_ids(tiny):
    _, tok = tiny
    small = trim_tokenizer(tok, _used_most(tok, len(tok) - 64))
    chat = tok.apply_chat_template([{"role": "user", "content": TEXT}], add_generation_prompt=True, tokenize=False)
    sequences = [tok(chat, add_special_tokens=False)["input_ids"], tok(TEXT)["input_ids"]]
    again = reencode(sequences, tok, small)
    assert all(max(ids) < len(small) for ids in again)
    assert [small.decode(ids) for ids in again] == [tok.decode(ids) for ids in sequences]
    assert again[0][0] == tok.convert_tokens_to_ids("<|im_start|>")  # the chat template's tokens stay special tokens


def test_distilling_onto_a_trimmed_vocabulary_targets_the_folded_softened_parent(tiny):
    _, tok = tiny
    keep = _used_most(tok, len(tok) - 64)
    vocab = VocabMap.between(tok, trim_tokenizer(tok, keep))
    parent_logits, student_logits, t = torch.randn(5, len(tok)), torch.randn(5, len(keep)), 2.0
    folded = vocab.fold_logprobs(torch.log_softmax(parent_logits / t, -1))  # what the member should say
    expected = F.kl_div(torch.log_softmax(student_logits / t, -1), folded, log_target=True, reduction="none").sum(-1).mean() * t * t
    got = distill_kl(student_logits, teacher_logprobs(parent_logits, vocab, t), t)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert teacher_logprobs(parent_logits, None, t) is parent_logits  # nothing trimmed: unchanged


def test_distilling_a_trimmed_parent_starts_from_the_kl_of_the_same_tokens(tiny, calib_rows):
    # The teacher reads the member's rows in its own ids; reading them as its ids would be another text.
    from plrd.heal import HealConfig, heal

    parent, tok = tiny
    keep = _used_most(tok, len(tok) - 64)
    vocab = VocabMap.between(tok, trim_tokenizer(tok, keep))
    member = trim_model(copy.deepcopy(parent), keep)
    rows = vocab.fold[calib_rows[:2, :32]]
    with torch.no_grad():
        expected = distill_kl(member(input_ids=rows).logits, teacher_logprobs(parent(input_ids=vocab.parent_ids(rows)).logits, vocab), 1.0).item()
    cfg = HealConfig(tokens=64, seq_len=32, batch_size=2, lr=0.0, distill_weight=1.0, bf16=False)
    result = heal(member, rows, cfg, teacher=parent, vocab=vocab, progress=False)
    assert result.first_loss == pytest.approx(expected, rel=1e-4) and result.first_loss < 1.0


def test_a_large_source_is_sampled_for_usage_not_read_whole(tiny, calib_ids):
    # The parent's usage is counted on at most `max_tokens`: a long text source costs no more than its corpus.
    model, tok = tiny
    sequences = [calib_ids.tolist()]
    calls = []
    original = model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].numel())
        return original(*args, **kwargs)

    model.forward = counting
    try:
        small = most_used_vocabulary(model, tok, sequences, len(tok) - 64, seq_len=32, max_tokens=256, progress=False)
    finally:
        del model.forward
    assert sum(calls) == 256 < len(calib_ids) and len(small.get_vocab()) == len(tok) - 64


def test_a_parent_token_is_matched_to_the_pieces_that_spell_it():
    # Bytes 0-3 | 3-8 | 8-9 in the parent; the member spells the second token in two pieces.
    assert chat_eval._spans([3, 8, 9], [3, 5, 8, 9]) == [(0, 1), (1, 3), (3, 4)]
    # A piece that straddles two parent tokens belongs to both.
    assert chat_eval._spans([4, 8], [2, 6, 8]) == [(0, 2), (1, 3)]
    # The same tokenization: one piece each.
    assert chat_eval._spans([1, 4, 6], [1, 4, 6]) == [(0, 1), (1, 2), (2, 3)]


def test_a_split_parent_token_agrees_only_when_every_piece_does():
    hits = torch.tensor([True, True, False, True])
    assert chat_eval.agreed(hits, [(0, 1), (1, 3), (3, 4)]) == 2  # the easy second piece is not counted alone
    assert chat_eval.agreed(torch.ones(4, dtype=torch.bool), [(0, 1), (1, 3), (3, 4)]) == 3
    assert chat_eval.agreed(hits, [(4, 4)]) == 0  # nothing spells it: not an agreement


def test_trimmed_answers_are_scored_per_token_of_the_parents_answers(tiny):
    model, tok = tiny
    ref = chat_eval.reference(model, tok, ["What is the capital of Japan?", "Name three colours."], max_new_tokens=12, progress=False)
    same = chat_eval.in_tokens_of(ref, tok, tok)
    assert [[(k, k + 1) for k in range(len(a))] for a in ref.answers] == same.parent_spans
    small = trim_tokenizer(tok, _used_most(tok, len(tok) - 64))
    member_ref = chat_eval.in_tokens_of(ref, tok, small)
    for a, m, spans in zip(ref.answers, member_ref.answers, member_ref.parent_spans):
        assert len(spans) == len(a) and spans[0][0] == 0 and spans[-1][1] == len(m)
        for piece, parent_id in zip(spans, a):  # each parent token's pieces spell it
            lo, hi = piece
            if parent_id != tok.eos_token_id:
                assert small.decode(m[lo:hi]) == tok.decode([parent_id])
