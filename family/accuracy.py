"""Accuracy of members on held-out text: perplexity, and agreement with the parent.

Windows are non-overlapping runs of `seq_len` tokens from the start of the text (the reference figure
in DESIGN.md, 25.6 for SmolLM2-135M on WikiText-2 test, is over the first 40 windows of 512).
Agreement is measured window by window with the parent's logits computed once per window and shared
by every member, so evaluating a whole family costs one parent pass, not one per member.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from family.errors import FamilyError


def windows(ids: torch.Tensor, seq_len: int = 512, max_windows: int | None = 40) -> torch.Tensor:
    """The first `max_windows` non-overlapping windows of `seq_len` tokens (all of them when None).

    Evaluation always reads the start of the text, unshuffled, so that figures are comparable between
    members, runs and papers.
    """
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    if len(rows) == 0:
        raise FamilyError(f"not enough text for one evaluation window of {seq_len} tokens ({len(ids)} tokens)")
    return rows if max_windows is None else rows[:max_windows]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, ids: torch.Tensor, seq_len: int = 512, max_windows: int | None = 40,
    batch_size: int = 4, progress: bool = True,
) -> float:
    """exp(mean next-token cross-entropy) over the first `max_windows` windows of `ids`."""
    return evaluate({"model": model}, None, ids, seq_len, max_windows, batch_size, progress)["model"].perplexity


@torch.no_grad()
def agreement(
    parent: torch.nn.Module, member: torch.nn.Module, ids: torch.Tensor, seq_len: int = 512, max_windows: int | None = 40,
    batch_size: int = 4, progress: bool = True,
) -> tuple[float, float]:
    """(top-1 agreement, mean KL(parent ‖ member) in nats per token) of `member` with `parent` on the
    same windows. The parent against itself gives (1.0, 0.0)."""
    s = evaluate({"member": member}, parent, ids, seq_len, max_windows, batch_size, progress)["member"]
    return s.top1_agreement, s.mean_kl


@dataclass
class Scores:
    perplexity: float
    top1_agreement: float | None  # share of positions where the member's argmax equals the parent's
    mean_kl: float | None  # mean KL(parent ‖ member) per token, nats
    tokens: int


@torch.no_grad()
def evaluate(
    members: dict[str, torch.nn.Module], parent: torch.nn.Module | None, ids: torch.Tensor, seq_len: int = 512,
    max_windows: int | None = 40, batch_size: int = 4, progress: bool = True,
) -> dict[str, Scores]:
    """Perplexity of each member, and its agreement with `parent` (when given), on the same windows."""
    rows = windows(ids, seq_len, max_windows)
    device = next(iter(members.values())).parameters().__next__().device
    nll = {n: 0.0 for n in members}
    agree = {n: 0 for n in members}
    kl = {n: 0.0 for n in members}
    count = 0
    desc = "eval " + ",".join(members) if len(members) <= 2 else f"eval {len(members)} members"
    bar = tqdm(total=rows.numel() * len(members), unit="tok", unit_scale=True, desc=desc, disable=not progress)
    start = time.perf_counter()
    for b in range(0, len(rows), batch_size):
        batch = rows[b : b + batch_size].to(device)
        targets = batch[:, 1:].reshape(-1)
        ref = None
        if parent is not None:
            ref = F.log_softmax(parent(input_ids=batch, use_cache=False).logits[:, :-1].float(), -1).reshape(len(targets), -1)
        for name, model in members.items():
            if model is parent:  # the parent against itself: reuse its logits, one forward pass
                logp = ref
            else:
                logp = F.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), -1).reshape(len(targets), -1)
            nll[name] += F.nll_loss(logp, targets, reduction="sum").item()
            if ref is not None:
                agree[name] += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
                kl[name] += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
            bar.update(batch.numel())
            bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start):.0f}")
        count += len(targets)
    bar.close()
    return {
        n: Scores(
            perplexity=math.exp(nll[n] / count),
            top1_agreement=agree[n] / count if parent is not None else None,
            mean_kl=kl[n] / count if parent is not None else None,
            tokens=count,
        )
        for n in members
    }


@torch.no_grad()
def perplexity_in_parent_tokens(model: torch.nn.Module, tokenizer, parent_tokenizer, rows: torch.Tensor, progress: bool = True) -> Scores:
    """Perplexity of a member that speaks another (trimmed) vocabulary, on the text of the parent's
    windows, per *parent* token: each window decoded and encoded in the member's tokenizer, the
    member's total negative log-likelihood divided by the positions the parent predicts there. The
    text is the same and so is the divisor, so it compares with the parent's perplexity as it is
    (a per-token perplexity would not: the member spends more, easier tokens on the same text).
    Agreement and KL at each position need the same tokens on both sides, so they are left out."""
    nll, count = 0.0, 0
    bar = tqdm(total=rows.numel(), unit="tok", unit_scale=True, desc="eval (own tokens)", disable=not progress)
    start = time.perf_counter()
    for row in rows:
        ids = torch.tensor([tokenizer(parent_tokenizer.decode(row), add_special_tokens=False)["input_ids"]])
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(row) - 1
        bar.update(len(row))
        bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start):.0f}")
    bar.close()
    return Scores(perplexity=math.exp(nll / count), top1_agreement=None, mean_kl=None, tokens=count)
