"""The torch engine's sampler: the nucleus found with topk is the textbook nucleus found by sorting."""

from __future__ import annotations

import pytest
import torch

from server.sampling import FIRST_K, nucleus, penalized, sample


def sorted_nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: sort the whole vocabulary, keep tokens while the mass before them is short of top_p."""
    probs = torch.softmax(logits.float() / temperature, -1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p
    return order[keep], sorted_p[keep]


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])  # near-uniform (a nucleus of thousands), ordinary, peaked
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.95])
def test_nucleus_is_the_sorted_nucleus(scale: float, top_p: float) -> None:
    logits = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * scale
    ids, probs = nucleus(logits, 0.7, top_p)
    want_ids, want_probs = sorted_nucleus(logits, 0.7, top_p)
    assert sorted(ids.tolist()) == sorted(want_ids.tolist())  # as sets: tokens of equal probability may swap places
    torch.testing.assert_close(probs[ids.argsort()], want_probs[want_ids.argsort()])
    assert (probs[:-1] >= probs[1:]).all()  # most likely first


def test_a_nucleus_past_the_first_guess_is_found_whole() -> None:
    logits = torch.zeros(5000)  # uniform: top_p 0.5 needs 2,500 tokens, far past FIRST_K
    ids, _ = nucleus(logits, 1.0, 0.5)
    assert len(ids) == 2500 > FIRST_K


def test_top_p_one_keeps_the_whole_vocabulary() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1))
    ids, probs = nucleus(logits, 1.0, 1.0)
    assert len(ids) == 300
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_sample_draws_only_from_the_nucleus_and_in_proportion() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(logits, temperature=1.0, top_p=0.8, generator=gen) for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.8: tokens 2 and 3 are outside
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03


def test_seeded_draws_repeat_and_temperature_zero_is_the_argmax() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    draw = lambda seed: [sample(logits, temperature=0.7, top_p=0.95, generator=g) for g in [torch.Generator().manual_seed(seed)] for _ in range(20)]
    assert draw(5) == draw(5)
    assert sample(logits, temperature=0.0, top_p=0.95) == int(logits.argmax())


def test_penalties_lower_the_tokens_already_generated() -> None:
    logits = torch.tensor([2.0, 1.9, 0.0])
    out = penalized(logits, {0: 2}, frequency_penalty=0.1, presence_penalty=0.5)
    assert out.tolist() == pytest.approx([2.0 - 0.2 - 0.5, 1.9, 0.0])
    assert sample(logits, temperature=0.0, top_p=1.0, counts={0: 2}, frequency_penalty=0.1, presence_penalty=0.5) == 1
    assert logits[0] == 2.0  # the caller's logits are left alone
