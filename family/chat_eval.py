"""Faithfulness to the parent on held-out chat: what decides whether a member is worth routing to.

On held-out chat prompts (never used for calibration or healing), the parent answers greedily once.
Each member is then measured two ways:
- teacher-forced on the parent's answers: the share of answer tokens where the member's argmax is
  the parent's token (`chat_agreement`, the router's accuracy), and KL(parent ‖ member) there
  (`chat_kl`, nats per token);
- free-running: the member's own greedy answer to each prompt, checked for degeneracy (blank lines,
  one token repeated, `<unk>`, WikiText markup): `degenerate_answers` is the share flagged.
Teacher forcing measures "nearly the same tokens"; the free-running check catches what a user sees
when small errors compound into garbage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from family.degeneracy import degenerate_reason
from family.generate import chat_prompt_ids, generate
from family.vocab_map import VocabMap

ANSWER_TOKENS = 64  # greedy tokens per answer: enough to see an answer go wrong, short enough for CPUs


@dataclass
class ChatReference:
    """The held-out prompts (token ids through the chat template) and the parent's greedy answers."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    answers: list[list[int]]  # the parent's greedy answer ids (with the end-of-turn token when reached)
    # In another tokenizer's ids (`in_tokens_of`): for each of the parent's answer tokens, the range of
    # answer tokens here that spell it (a removed token is spelled in pieces). None: the parent's ids.
    parent_spans: list[list[tuple[int, int]]] | None = None


@dataclass
class ChatScores:
    agreement: float
    kl: float
    tokens: int  # the parent's answer tokens scored
    degenerate_share: float
    answers: list[str]  # the member's own greedy answers
    reasons: list[str | None]  # why each answer is degenerate, or None


def _batches(n: int, size: int):
    return [range(b, min(n, b + size)) for b in range(0, n, size)]


def greedy_answers(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int = ANSWER_TOKENS, batch_size: int = 16,
                   progress: bool = True, desc: str = "answers") -> list[list[int]]:
    bar = tqdm(total=len(prompt_ids) * max_new_tokens, unit="tok", unit_scale=True, desc=desc, disable=not progress)
    start = time.perf_counter()
    # Similar lengths together: less padding (order restored below).
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    by_index: dict[int, list[int]] = {}
    for rng in _batches(len(order), batch_size):
        idx = [order[i] for i in rng]
        for i, ids in zip(idx, generate(model, tokenizer, [prompt_ids[i] for i in idx], max_new_tokens=max_new_tokens)):
            by_index[i] = ids
        bar.update(len(idx) * max_new_tokens)
        bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start):.0f}")
    bar.close()
    return [by_index[i] for i in range(len(prompt_ids))]


def reference(parent, tokenizer, prompts: list[str], *, max_new_tokens: int = ANSWER_TOKENS, progress: bool = True) -> ChatReference:
    prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    answers = greedy_answers(parent, tokenizer, prompt_ids, max_new_tokens, progress=progress, desc="parent answers")
    return ChatReference(prompts, prompt_ids, answers)


@torch.no_grad()
def _answer_logprobs(model, ref: ChatReference, rows: range) -> list[torch.Tensor]:
    """Log-probabilities at the positions that predict each answer token (answer_len × vocab)."""
    seqs = [ref.prompt_ids[i] + ref.answers[i] for i in rows]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, s in enumerate(seqs):  # right padding: causal positions before the padding are unaffected
        ids[k, : len(s)] = torch.tensor(s)
        mask[k, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    out = []
    for k, i in enumerate(rows):
        p, a = len(ref.prompt_ids[i]), len(ref.answers[i])
        out.append(F.log_softmax(logits[k, p - 1 : p - 1 + a], -1))
    return out


def in_parent_ids(ref: ChatReference, vocab: VocabMap) -> ChatReference:
    """A reference in a member's ids (`in_tokens_of`) as the parent's ids of the same tokens."""
    to = lambda ids: vocab.parent_ids(torch.tensor(ids, dtype=torch.long)).tolist()  # noqa: E731
    return ChatReference(ref.prompts, [to(p) for p in ref.prompt_ids], [to(a) for a in ref.answers])


def _byte_ends(tokenizer, ids: list[int]) -> list[int]:
    """Where each token ends in the answer's bytes. A byte-level BPE token's string has one symbol per
    byte; a special token (the end of turn) counts as one byte of its own, so that it is a span too."""
    special, ends, at = set(tokenizer.all_special_ids), [], 0
    for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        at += 1 if i in special else len(t)
        ends.append(at)
    return ends


def _spans(parent_ends: list[int], ends: list[int]) -> list[tuple[int, int]]:
    """For each parent token (ending at `parent_ends`), the range of the other tokens (ending at
    `ends`) that overlap its bytes."""
    spans, lo, start = [], 0, 0
    for end in parent_ends:
        while lo < len(ends) and ends[lo] <= start:
            lo += 1
        hi = lo
        while hi < len(ends) and (hi == lo or ends[hi - 1] < end):
            hi += 1
        spans.append((lo, hi))
        start = end
    return spans


def agreed(hits: torch.Tensor, spans: list[tuple[int, int]]) -> int:
    """How many parent tokens agree: those whose every piece (`spans`, ranges into `hits`) is a hit."""
    return sum(hi > lo and bool(hits[lo:hi].all()) for lo, hi in spans)


def in_tokens_of(ref: ChatReference, parent_tokenizer, tokenizer) -> ChatReference:
    """The same prompts and parent answers in another tokenizer's ids (a member with a trimmed
    vocabulary, plrd/vocab.py): each answer decoded to text and encoded again, its end-of-turn kept,
    with which of those tokens spell each of the parent's (`parent_spans`)."""
    eos = parent_tokenizer.eos_token_id
    answers, spans = [], []
    for a in ref.answers:
        ids = tokenizer(parent_tokenizer.decode(a, skip_special_tokens=True), add_special_tokens=False)["input_ids"]
        ids += [tokenizer.eos_token_id] if a and a[-1] == eos else []
        answers.append(ids)
        spans.append(_spans(_byte_ends(parent_tokenizer, a), _byte_ends(tokenizer, ids)))
    return ChatReference(ref.prompts, [chat_prompt_ids(tokenizer, p) for p in ref.prompts], answers, spans)


@torch.no_grad()
def score(member, parent, tokenizer, ref: ChatReference, *, batch_size: int = 8, progress: bool = True, name: str = "member",
          vocab: VocabMap | None = None) -> ChatScores:
    """Chat agreement, KL and degeneracy of `member` against the parent's reference answers.
    The parent scored against itself gives agreement 1.0 and KL 0 (its answers are its argmax).
    With a trimmed vocabulary, `ref` is in the member's tokens (`in_tokens_of`) and `vocab` relates
    the two vocabularies: the parent reads the same tokens in its own ids, and KL is to its
    distribution summed onto the ids the member can say. Both are then counted per token of the
    parent's answers, as for every other member: a parent token agrees when each piece the member
    spells it in is the member's argmax (the second piece of a split word is easy, so counting pieces
    would flatter a smaller vocabulary), and KL is the answers' total over the parent's tokens."""
    agree, kl, tokens = 0, 0.0, 0
    parent_ref = ref if vocab is None else in_parent_ids(ref, vocab)
    for rows in _batches(len(ref.prompts), batch_size):
        mine = _answer_logprobs(member, ref, rows)
        theirs = mine if member is parent else _answer_logprobs(parent, parent_ref, rows)
        if vocab is not None:
            theirs = [vocab.fold_logprobs(lp) for lp in theirs]
        for i, lm, lp in zip(rows, mine, theirs):
            target = torch.tensor(ref.answers[i])
            hits = (lm.argmax(-1) == target) if member is not parent else torch.ones(len(target), dtype=torch.bool)
            spans = [(k, k + 1) for k in range(len(target))] if ref.parent_spans is None else ref.parent_spans[i]
            agree, tokens = agree + agreed(hits, spans), tokens + len(spans)
            kl += F.kl_div(lm, lp, log_target=True, reduction="sum").item()
    own = ref.answers if member is parent else greedy_answers(
        member, tokenizer, ref.prompt_ids, max(len(a) for a in ref.answers), progress=progress, desc=f"{name} answers")
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in own]
    reasons = [degenerate_reason(t) for t in texts]
    return ChatScores(agree / max(1, tokens), kl / max(1, tokens), tokens, sum(r is not None for r in reasons) / len(texts), texts, reasons)


def score_member(member, parent, parent_tokenizer, member_tokenizer, ref: ChatReference, **kwargs) -> ChatScores:
    """`score`, in the member's own tokens when its vocabulary is the parent's trimmed (plrd/vocab.py)."""
    if member.config.vocab_size < parent.config.vocab_size:
        return score(member, parent, member_tokenizer, in_tokens_of(ref, parent_tokenizer, member_tokenizer),
                     vocab=VocabMap.between(parent_tokenizer, member_tokenizer), **kwargs)
    return score(member, parent, parent_tokenizer, ref, **kwargs)
