"""The next token from one row's logits: greedy, or temperature and nucleus (top-p) sampling.

Why not sort the vocabulary, as the textbook nucleus does: torch's CPU sort of SmolLM2's 49,152
logits takes about 4.5 ms, a third of the parent's whole decode step on two cores, and it is paid for
every row at every token. The nucleus is almost always a few dozen tokens, so it is found with `topk`
instead, k growing until the top k hold `top_p` of the mass. That is exact: every token past them has
at least that mass before it, so the sorted rule would drop it too. Only the nucleus is sampled from.
"""

from __future__ import annotations

import torch

FIRST_K = 64  # the first guess at the nucleus's size; k grows ×4 from here while the top k hold less than top_p


def penalized(logits: torch.Tensor, counts: dict[int, int], frequency_penalty: float, presence_penalty: float) -> torch.Tensor:
    """OpenAI's penalties: each token already generated loses frequency × its count + presence."""
    if not (frequency_penalty or presence_penalty) or not counts:
        return logits
    seen = torch.tensor(list(counts), dtype=torch.long)
    times = torch.tensor(list(counts.values()), dtype=logits.dtype)
    logits = logits.clone()
    logits[seen] -= frequency_penalty * times + presence_penalty
    return logits


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids of the smallest set of most likely tokens whose probability reaches `top_p` (at
    `temperature`), most likely first, and their probabilities (not renormalised)."""
    scaled = logits.float() / temperature
    if top_p >= 1.0:
        return torch.arange(scaled.numel()), torch.softmax(scaled, -1)
    log_total = torch.logsumexp(scaled, -1)
    n, k = scaled.numel(), FIRST_K
    while True:
        k = min(k, n)
        top, ids = scaled.topk(k)  # sorted, most likely first
        probs = (top - log_total).exp()
        if k == n or float(probs.sum()) >= top_p:
            break
        k *= 4
    keep = probs.cumsum(-1) - probs < top_p  # a token is kept while the mass before it is short of top_p
    return ids[keep], probs[keep]


def sample(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None = None,
           counts: dict[int, int] | None = None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> int:
    """One token id: the argmax at temperature 0, else a draw from the nucleus."""
    logits = penalized(logits, counts or {}, frequency_penalty, presence_penalty)
    if temperature <= 0:
        return int(logits.argmax())
    ids, probs = nucleus(logits, temperature, top_p)
    return int(ids[torch.multinomial(probs, 1, generator=generator)])
