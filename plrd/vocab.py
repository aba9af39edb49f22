"""Vocabulary trimming: a member that keeps the first `size` tokens of the parent's byte-level BPE.

Why: the tied embedding / LM head is a fifth of SmolLM2-135M's parameters, and low rank is the worst
place to cut it (README, "Where low rank costs least"). A BPE vocabulary learned merge by merge has
its tokens in merge order, and a merge's two parts always come before its product, so the first
`size` ids are a closed vocabulary: the tokenizer trained with fewer merges. Keeping them is a slice
of the embedding, nothing else changes, and on every text the member's logits over the kept ids are
the parent's logits on that text's (longer) tokenization. What is lost is the parent's one-token
spelling of rarer words; they are spelled in pieces instead.

`trim_tokenizer` refuses a tokenizer where that closure does not hold (not BPE, merges out of id
order, a kept merge with a removed part), so a vocabulary is never cut into one that cannot encode
what the parent could.
"""

from __future__ import annotations

import copy
import json

import torch
from tokenizers import Tokenizer
from torch import nn

from family.chat_eval import fold_logprobs
from family.errors import FamilyError


def _bpe(tokenizer) -> dict:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"].get("type") != "BPE":
        raise FamilyError(f"vocabulary trimming needs a BPE tokenizer, got {spec['model'].get('type')!r}")
    return spec


def _merge_parts(merge) -> list[str]:
    """A merge's two parts (tokenizer.json stores a merge as a pair, or as one "a b" string)."""
    return merge if isinstance(merge, list) else merge.split(" ")


def trim_tokenizer(tokenizer, size: int):
    """A copy of `tokenizer` that only ever produces ids below `size` (its first merges)."""
    spec = _bpe(tokenizer)
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    special = max((t["id"] for t in spec.get("added_tokens", [])), default=-1)
    if size > len(vocab):
        raise FamilyError(f"vocabulary size {size} is past the tokenizer's {len(vocab)}")
    if size <= special:
        raise FamilyError(f"vocabulary size {size} would drop special token id {special}")
    kept = {s: i for s, i in vocab.items() if i < size}
    kept_merges = [m for m in merges if vocab["".join(_merge_parts(m))] < size]
    for m in kept_merges:
        parts = _merge_parts(m)
        if any(p not in kept for p in parts):
            raise FamilyError(f"merge {parts} keeps a token whose parts are not all below id {size}: merges are not in id order")
    spec["model"]["vocab"], spec["model"]["merges"] = kept, kept_merges
    out = copy.deepcopy(tokenizer)
    out._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return out


def trim_model(model: nn.Module, size: int) -> nn.Module:
    """Keep the first `size` rows of the (tied) embedding and LM head, in place."""
    if not getattr(model.config, "tie_word_embeddings", False):
        raise FamilyError("vocabulary trimming here expects a tied embedding / LM head")
    embed = model.get_input_embeddings()
    trimmed = nn.Embedding(size, embed.embedding_dim, _weight=embed.weight.data[:size].clone())
    model.set_input_embeddings(trimmed)
    model.lm_head.weight = trimmed.weight
    model.lm_head.out_features = size
    model.config.vocab_size = size
    return model


def reencode(sequences, tokenizer, trimmed) -> list[list[int]]:
    """Token sequences of the parent's tokenizer, in the trimmed tokenizer's ids: each decoded to text
    (special tokens such as the chat template's kept as text) and encoded again, so that the same
    conversations and texts train and calibrate a member that cannot say the removed ids."""
    return [trimmed(tokenizer.decode(list(s)), add_special_tokens=False)["input_ids"] for s in sequences]


def teacher_logprobs(logits: torch.Tensor, index: torch.Tensor, size: int, temperature: float = 1.0) -> torch.Tensor:
    """The parent's temperature-softened log-distribution folded onto a trimmed member's `size` ids,
    multiplied back by the temperature: logits that `plrd.heal.distill_kl` softens into exactly that
    folded distribution. Where nothing is trimmed (`size` is the logits' width) they are returned as they are."""
    if logits.shape[-1] == size:
        return logits
    return fold_logprobs(torch.log_softmax(logits.float() / temperature, -1), index.to(logits.device), size) * temperature

