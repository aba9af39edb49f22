"""Vocabulary trimming keeps the BPE's first merges: a closed vocabulary, the parent's own logits on it."""

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer

from family import chat_eval
from family.errors import FamilyError
from plrd.heal import distill_kl
from family.chat_eval import fold_index
from plrd.vocab import reencode, teacher_logprobs, trim_model, trim_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog, and the capital of Japan is Tokyo. Ünïcödé too."


def test_trimmed_tokenizer_spells_every_text_with_kept_ids(tiny):
    _, tok = tiny
    size = len(tok) - 64
    full_ids = tok(TEXT)["input_ids"]
    small = trim_tokenizer(tok, size)
    ids = small(TEXT)["input_ids"]
    assert max(ids) < size
    assert len(ids) > len(full_ids)  # rarer words now take pieces
    assert small.decode(ids) == tok.decode(full_ids) == TEXT
    assert tok(TEXT)["input_ids"] == full_ids and len(tok) == size + 64  # the parent's tokenizer is untouched


def test_trimmed_model_is_the_parents_logits_on_the_kept_ids(tiny):
    model, tok = tiny
    size = len(tok) - 64
    member = trim_model(copy.deepcopy(model), size)
    ids = torch.tensor([trim_tokenizer(tok, size)(TEXT)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(member(input_ids=ids).logits, model(input_ids=ids).logits[..., :size])
    assert member.config.vocab_size == size and member.lm_head.weight is member.get_input_embeddings().weight


def test_fold_sends_a_removed_token_to_the_first_piece_of_its_spelling(tiny):
    _, tok = tiny
    size = len(tok) - 64
    small = trim_tokenizer(tok, size)
    index = fold_index(tok, small)
    assert torch.equal(index[:size], torch.arange(size))
    removed = len(tok) - 1
    text = tok.decode([removed])
    assert index[removed].item() == small(text, add_special_tokens=False)["input_ids"][0]
    folded = chat_eval.fold_logprobs(torch.log_softmax(torch.randn(3, len(tok)), -1), index, size)
    assert folded.shape == (3, size) and torch.allclose(folded.exp().sum(-1), torch.ones(3))


def test_chat_scores_of_a_trimmed_member_are_in_its_own_tokens(tiny):
    model, tok = tiny
    prompts = ["What is the capital of Japan?", "Name three colours."]
    ref = chat_eval.reference(model, tok, prompts, max_new_tokens=12, progress=False)
    same = chat_eval.score(copy.deepcopy(model), model, tok, chat_eval.in_tokens_of(ref, tok, tok),
                           fold=torch.arange(len(tok)), progress=False)
    assert same.kl == pytest.approx(0.0, abs=1e-5)
    size = len(tok) - 64
    small = trim_tokenizer(tok, size)
    trimmed = chat_eval.score(trim_model(copy.deepcopy(model), size), model, small, chat_eval.in_tokens_of(ref, tok, small),
                              fold=fold_index(tok, small), progress=False)
    assert 0.0 <= trimmed.agreement <= 1.0 and 0.0 <= trimmed.kl < 50


def test_refuses_what_would_not_be_the_parents_vocabulary(tiny):
    _, tok = tiny
    with pytest.raises(FamilyError, match="past the tokenizer"):
        trim_tokenizer(tok, len(tok) + 1)
    with pytest.raises(FamilyError, match="special token"):
        trim_tokenizer(tok, 2)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab, first = spec["model"]["vocab"], spec["model"]["merges"][0]
    product = "".join(first) if isinstance(first, list) else first.replace(" ", "")
    last = max(vocab, key=vocab.get)
    vocab[product], vocab[last] = vocab[last], vocab[product]  # the first merge's product now has the last id
    shuffled = copy.deepcopy(tok)
    shuffled._tokenizer = Tokenizer.from_str(json.dumps(spec))
    with pytest.raises(FamilyError, match="not in id order"):
        trim_tokenizer(shuffled, len(tok) - 1)


def test_the_parents_sequences_reencoded_say_the_same_text_in_kept_ids(tiny):
    _, tok = tiny
    small = trim_tokenizer(tok, len(tok) - 64)
    chat = tok.apply_chat_template([{"role": "user", "content": TEXT}], add_generation_prompt=True, tokenize=False)
    sequences = [tok(chat, add_special_tokens=False)["input_ids"], tok(TEXT)["input_ids"]]
    again = reencode(sequences, tok, small)
    assert all(max(ids) < len(small) for ids in again)
    assert [small.decode(ids) for ids in again] == [tok.decode(ids) for ids in sequences]
    assert again[0][0] == tok.convert_tokens_to_ids("<|im_start|>")  # the chat template's tokens stay special tokens


def test_distilling_onto_a_trimmed_vocabulary_targets_the_folded_softened_parent(tiny):
    _, tok = tiny
    size = len(tok) - 64
    index = fold_index(tok, trim_tokenizer(tok, size))
    parent_logits, student_logits, t = torch.randn(5, len(tok)), torch.randn(5, size), 2.0
    folded = chat_eval.fold_logprobs(torch.log_softmax(parent_logits / t, -1), index, size)  # what the member should say
    expected = torch.nn.functional.kl_div(torch.log_softmax(student_logits / t, -1), folded, log_target=True, reduction="none").sum(-1).mean() * t * t
    got = distill_kl(student_logits, teacher_logprobs(parent_logits, index, size, t), t)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert teacher_logprobs(parent_logits, index, len(tok), t) is parent_logits  # nothing trimmed: unchanged

