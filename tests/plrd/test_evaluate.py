"""Perplexity: exp of the mean next-token cross-entropy over the first windows of the text."""

import math
from types import SimpleNamespace

import pytest
import torch

from plrd.evaluate import perplexity


class Constant(torch.nn.Module):
    """A 'model' whose next-token distribution is fixed: `logits` at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    ids = torch.randint(0, 50, (5000,))
    assert perplexity(Constant(torch.zeros(50)), ids, seq_len=64, max_windows=10, progress=False) == pytest.approx(50)


def test_perplexity_counts_only_the_first_windows():
    # Windows 0-1 hold only token 0; later text only token 1. A model sure of token 0 scores 1 there.
    ids = torch.cat([torch.zeros(128, dtype=torch.long), torch.ones(1000, dtype=torch.long)])
    sure = Constant(torch.tensor([20.0, -20.0]))
    assert perplexity(sure, ids, seq_len=64, max_windows=2, batch_size=1, progress=False) == pytest.approx(1.0, abs=1e-6)
    assert perplexity(sure, ids, seq_len=64, max_windows=4, progress=False) > math.e ** 10
