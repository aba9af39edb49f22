"""Perplexity on held-out text: exp(mean next-token cross-entropy) over the first N windows.

The windows are `plrd.data.eval_windows` (non-overlapping, from the start of the text, unshuffled),
so every member of a family, and every run, is scored on exactly the same tokens. The reference
figure in DESIGN.md (25.6 for SmolLM2-135M on WikiText-2 test) is over the first 40 windows of 512.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from plrd.data import eval_windows


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seq_len: int = 512,
    max_windows: int | None = 40,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """Perplexity of `model` on the first `max_windows` windows of `seq_len` tokens of `token_ids` (1-D)."""
    rows = eval_windows(token_ids, seq_len, max_windows)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    bar = tqdm(total=rows.numel(), unit="tok", unit_scale=True, desc="perplexity", disable=not progress)
    start = time.perf_counter()
    try:
        for b in range(0, len(rows), batch_size):
            batch = rows[b : b + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
            bar.update(batch.numel())
            bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start):.0f}")
    finally:
        bar.close()
        model.train(was_training)
    return math.exp(nll / count)
