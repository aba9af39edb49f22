"""How a member's trimmed vocabulary sits inside its parent's (plrd/vocab.py makes such members).

A trimmed member keeps a subset of the parent's BPE tokens, numbered 0..size-1 in the parent's id
order. Two maps connect the vocabularies, and both follow from the two tokenizers alone (a token is
the same token when its string is), so a member folder needs no extra file:
- `to_parent`: the parent's id of each member id. The parent reads a member's token sequence (to
  teach it, to score it) in its own ids: the same tokens, the same text.
- `fold`: for each parent id, the member id it lands on: its own where kept, else the first piece of
  its spelling in the member's tokenizer. The parent's probabilities summed by `fold` are its
  next-token distribution in the member's vocabulary: what the member should predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VocabMap:
    to_parent: torch.Tensor  # (member vocab,) parent id of each member id
    fold: torch.Tensor  # (parent vocab,) member id each parent id lands on

    @classmethod
    def between(cls, parent_tokenizer, member_tokenizer) -> VocabMap:
        parent_vocab, member_vocab = parent_tokenizer.get_vocab(), member_tokenizer.get_vocab()
        to_parent = torch.empty(max(member_vocab.values()) + 1, dtype=torch.long)
        for token, i in member_vocab.items():
            to_parent[i] = parent_vocab[token]
        fold = torch.empty(max(parent_vocab.values()) + 1, dtype=torch.long)
        bpe = member_tokenizer.backend_tokenizer.model
        for token, i in parent_vocab.items():
            fold[i] = member_vocab[token] if token in member_vocab else bpe.tokenize(token)[0].id
        return cls(to_parent, fold)

    @property
    def size(self) -> int:
        return len(self.to_parent)

    def parent_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Member token ids → the parent's ids of the same tokens."""
        return self.to_parent.to(ids.device)[ids]

    def fold_logprobs(self, logprobs: torch.Tensor) -> torch.Tensor:
        """The parent's log-probabilities summed onto the member's ids."""
        probs = torch.zeros(*logprobs.shape[:-1], self.size, dtype=logprobs.dtype, device=logprobs.device)
        probs.index_add_(-1, self.fold.to(logprobs.device), logprobs.exp())
        return probs.clamp_min(1e-30).log()
