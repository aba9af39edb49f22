"""Vocabulary trimming: a member that keeps the tokens its parent uses most, in the parent's byte-level BPE.

Why: the tied embedding / LM head is a fifth of SmolLM2-135M's parameters, and low rank is the worst
place to cut it (docs/results/faithfulness.md, "Where low rank costs least"). A BPE token is made by one merge of two
earlier tokens, so a set of tokens that holds both parts of each of its merges (and every base
token) is a vocabulary the parent's tokenizer can still work in: the same merges, fewer of them. A
model keeping such a set is a row selection of the embedding, nothing else changes, and on every
text its logits over the kept ids are the parent's logits on that text's (longer) tokenization. What
is lost is the parent's one-token spelling of the removed tokens; they are spelled in pieces.

Which tokens: those the parent itself puts most probability on over its own corpus (`token_usage`,
its expected token counts, which cover tokens a 71k-token sample never shows), each with the parts
its merges need (`choose_vocabulary`). The BPE's first N ids (its first merges, the tokenizer
trained with fewer merges, `first_ids`) are the other choice: they follow the frequencies of the
tokenizer's own training data, code and all, and lose more of the parent's chat (docs/results/faithfulness.md, "Vocabulary
trimming").

Kept tokens are renumbered 0..size-1 in the parent's id order, so the special tokens keep their ids;
family/vocab_map.py relates the two vocabularies for distillation and scoring.
"""

from __future__ import annotations

import copy
import json

import torch
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from family import defaults
from family.errors import FamilyError
from family.vocab_map import VocabMap
from family.text import pack


def _bpe(tokenizer) -> dict:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"].get("type") != "BPE":
        raise FamilyError(f"vocabulary trimming needs a BPE tokenizer, got {spec['model'].get('type')!r}")
    # Byte-level: one symbol per byte in every token's string, which is how a trimmed member's pieces
    # are matched to the parent's tokens when it is scored (family/chat_eval.py).
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise FamilyError(f"vocabulary trimming needs a byte-level BPE (decoder ByteLevel), got {(spec.get('decoder') or {}).get('type')!r}")
    return spec


def _merge_parts(merge) -> list[str]:
    """A merge's two parts (tokenizer.json stores a merge as a pair, or as one "a b" string)."""
    return merge if isinstance(merge, list) else merge.split(" ")


def _merge_tree(tokenizer) -> tuple[dict, dict[str, list[str]]]:
    """The BPE's vocabulary and, for every token a merge makes, that merge's two parts."""
    spec = _bpe(tokenizer)
    return spec["model"]["vocab"], {"".join(_merge_parts(m)): _merge_parts(m) for m in spec["model"]["merges"]}


def first_ids(size: int) -> list[int]:
    """The BPE's first `size` ids: its first merges (closed, since a merge's parts come before it)."""
    return list(range(size))


@torch.no_grad()
def token_usage(model: nn.Module, rows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """The model's expected count of each token over `rows` (N × L ids): its next-token
    probabilities summed over every position."""
    usage = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for i in tqdm(range(0, len(rows), batch_size), desc="token usage", unit="batch", disable=not progress):
        logits = model(input_ids=rows[i : i + batch_size], use_cache=False).logits
        usage += torch.softmax(logits.float(), -1).sum((0, 1)).double()
    return usage


def choose_vocabulary(tokenizer, usage: torch.Tensor, size: int, within: list[int] | None = None) -> list[int]:
    """The parent ids of a closed vocabulary of `size` tokens: every base token (specials, the byte
    alphabet), then tokens by descending `usage`, each with the merge parts it needs; a token whose
    parts would overflow `size` is passed over. Ties go to the lower id (the earlier merge).
    `within`: only these ids (a closed vocabulary: a larger member's), so that a smaller member of a
    family speaks a subset of the larger one it is cut from."""
    vocab, parts_of = _merge_tree(tokenizer)
    keep = {i for token, i in vocab.items() if token not in parts_of}
    if size < len(keep):
        raise FamilyError(f"vocabulary size {size} is below the tokenizer's {len(keep)} base tokens")
    if size > len(vocab):
        raise FamilyError(f"vocabulary size {size} is past the tokenizer's {len(vocab)}")
    token_of = {i: token for token, i in vocab.items()}

    def needed(token: str, into: set[int]) -> None:
        if vocab[token] not in keep and vocab[token] not in into:
            for part in parts_of.get(token, []):
                needed(part, into)
            into.add(vocab[token])

    allowed = set(token_of) if within is None else set(within)
    if size > len(allowed):
        raise FamilyError(f"vocabulary size {size} is past the {len(allowed)} tokens it is chosen within")
    for i in sorted(allowed, key=lambda i: (-float(usage[i]), i)):
        if len(keep) >= size:
            break
        add: set[int] = set()
        needed(token_of[i], add)
        if len(keep) + len(add) <= size:
            keep |= add
    return sorted(keep)


def usage_on(parent: nn.Module, sequences: list[list[int]], *, seq_len: int = 256, max_tokens: int = defaults.VOCAB_USAGE_TOKENS,
             seed: int = 0, progress: bool = True) -> torch.Tensor:
    """`token_usage` of `parent` on `sequences` (in its own ids), from at most `max_tokens` of them
    (rows drawn at random), so a large text source costs no more than the parent's own corpus (about
    71k tokens, read whole)."""
    rows = pack(torch.tensor([t for seq in sequences for t in seq], dtype=torch.long), seq_len)
    if len(rows) * seq_len > max_tokens:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[: max(1, max_tokens // seq_len)]]
    return token_usage(parent, rows, progress=progress)


def most_used_vocabulary(parent: nn.Module, tokenizer, sequences: list[list[int]], size: int, *, seq_len: int = 256,
                         max_tokens: int = defaults.VOCAB_USAGE_TOKENS, seed: int = 0, progress: bool = True):
    """The trimmed tokenizer of the `size` tokens `parent` uses most on `sequences` (`usage_on`)."""
    usage = usage_on(parent, sequences, seq_len=seq_len, max_tokens=max_tokens, seed=seed, progress=progress)
    return trim_tokenizer(tokenizer, choose_vocabulary(tokenizer, usage, size))


def trim_tokenizer(tokenizer, keep: list[int]):
    """A copy of `tokenizer` that speaks only the parent ids `keep` (sorted), renumbered 0..len-1."""
    spec = _bpe(tokenizer)
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= len(vocab):
        raise FamilyError(f"the kept ids must be distinct, sorted and within the tokenizer's {len(vocab)}")
    token_of = {i: token for token, i in vocab.items()}
    kept = {token_of[i]: n for n, i in enumerate(keep)}
    for t in spec.get("added_tokens", []):
        if kept.get(t["content"]) != t["id"]:
            raise FamilyError(f"special token {t['content']!r} (id {t['id']}) would be dropped or renumbered")
    kept_merges = [m for m in merges if "".join(_merge_parts(m)) in kept]
    for m in kept_merges:
        if any(p not in kept for p in _merge_parts(m)):
            raise FamilyError(f"merge {_merge_parts(m)} keeps a token whose parts are not all kept: not a closed vocabulary")
    products = {"".join(_merge_parts(m)) for m in merges}
    if missing := [t for t in vocab if t not in kept and t not in products]:
        raise FamilyError(f"base token {missing[0]!r} would be dropped: every text must stay encodable")
    spec["model"]["vocab"], spec["model"]["merges"] = kept, kept_merges
    out = copy.deepcopy(tokenizer)
    out._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return out


def trim_model(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep the rows `keep` of the (tied) embedding and LM head, in that order, in place."""
    if not getattr(model.config, "tie_word_embeddings", False):
        raise FamilyError("vocabulary trimming here expects a tied embedding / LM head")
    embed = model.get_input_embeddings()
    trimmed = nn.Embedding(len(keep), embed.embedding_dim, _weight=embed.weight.data[torch.tensor(keep)].clone())
    model.set_input_embeddings(trimmed)
    model.lm_head.weight = trimmed.weight
    model.lm_head.out_features = len(keep)
    model.config.vocab_size = len(keep)
    return model


def reencode(sequences, tokenizer, trimmed) -> list[list[int]]:
    """Token sequences of the parent's tokenizer, in the trimmed tokenizer's ids: each decoded to text
    (special tokens such as the chat template's kept as text) and encoded again, so that the same
    conversations and texts train and calibrate a member that cannot say the removed ids."""
    return [trimmed(tokenizer.decode(list(s)), add_special_tokens=False)["input_ids"] for s in sequences]


def teacher_logprobs(logits: torch.Tensor, vocab: VocabMap | None, temperature: float = 1.0) -> torch.Tensor:
    """The parent's temperature-softened log-distribution folded onto a trimmed member's ids,
    multiplied back by the temperature: logits that `plrd.heal.distill_kl` softens into exactly that
    folded distribution. Where nothing is trimmed (`vocab` is None) they are returned as they are."""
    if vocab is None:
        return logits
    return vocab.fold_logprobs(torch.log_softmax(logits.float() / temperature, -1)) * temperature
