"""Accuracy of a member on held-out text: perplexity, and agreement with the parent.

Windows are non-overlapping runs of `seq_len` tokens from the start of the text (the reference figure
in DESIGN.md, 25.6 for SmolLM2-135M on WikiText-2 test, is over the first 40 windows of 512).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    return rows if max_windows is None else rows[:max_windows]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, ids: torch.Tensor, seq_len: int = 512, max_windows: int | None = 40,
    batch_size: int = 4, progress: bool = True,
) -> float:
    """exp(mean next-token cross-entropy) over the first `max_windows` windows of `ids`."""
    rows = windows(ids, seq_len, max_windows)
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(total=rows.numel(), unit="tok", unit_scale=True, desc="perplexity", disable=not progress)
    start = time.perf_counter()
    for b in range(0, len(rows), batch_size):
        batch = rows[b : b + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
        bar.update(batch.numel())
        bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start):.0f}")
    bar.close()
    return math.exp(total_nll / total_tokens)
