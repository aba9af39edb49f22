"""On-policy distillation: the member writes the answers, the parent grades every token of them.

Distilling on the parent's answers alone (off-policy) trains the member only on contexts the parent
produces. At serving time the member reads its own tokens; once its greedy answer drifts (a repeated
word, a wrong name), it is in a state the corpus never showed it, and it loops: exposure bias. Here the
member answers the shipped seed prompts itself, and the loss is KL(parent ‖ member) at each of its own
tokens, with the parent's full distribution as the target (GKD, Agarwal et al. 2024, forward KL on
student samples). The member learns what the parent would say next in exactly the states it gets
itself into.

It runs in rounds, each one pass of `plrd.heal.heal` on fresh answers: the current member answers the
next `round_prompts` seed prompts (a seeded shuffle, cycled), then heals on those rows. The next round's
answers come from the improved member. Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm import tqdm

from family.generate import generate
from family.text import pack
from plrd.heal import HealConfig, HealResult, heal


@dataclass(frozen=True)
class OnPolicyConfig:
    tokens: int  # distillation tokens on the member's own answers (prompt + answer rows, as heal counts them)
    round_prompts: int = 128  # prompts answered per round, then trained on before the next round
    max_new_tokens: int = 96
    greedy_tokens: int = 0  # the first answer tokens greedy (0: sampled from the first token)
    temperature: float = 1.0  # the member's own distribution, as GKD samples it; 0: its greedy answers (where it loops)
    top_p: float = 1.0
    batch_size: int = 32  # generation batch
    seed: int = 0


def member_answers(member: nn.Module, tokenizer, prompts: list[list[int]], cfg: OnPolicyConfig, seed: int) -> torch.Tensor:
    """Each prompt followed by the member's sampled answer, concatenated (for packing into rows)."""
    member.eval()
    ids: list[int] = []
    for b in range(0, len(prompts), cfg.batch_size):
        batch = prompts[b : b + cfg.batch_size]
        outs = generate(
            member, tokenizer, batch, max_new_tokens=cfg.max_new_tokens,
            greedy_tokens=cfg.max_new_tokens if cfg.temperature == 0 else cfg.greedy_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, seed=seed * 1_000 + b,
        )
        for p, new in zip(batch, outs):
            ids += list(p) + new
    return torch.tensor(ids, dtype=torch.long)


def distill_on_policy(
    member: nn.Module, parent: nn.Module, tokenizer, prompts: list[list[int]], cfg: OnPolicyConfig, heal_cfg: HealConfig,
    progress: bool = True,
) -> list[HealResult]:
    """Distil `member` (in place) from `parent` on its own answers to `prompts` until `cfg.tokens` are seen."""
    if cfg.tokens <= 0:
        return []
    if not prompts:
        raise ValueError("on-policy distillation needs prompts")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    results: list[HealResult] = []
    done, rnd = 0, 0
    bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, desc="on-policy", disable=not progress)
    while done < cfg.tokens:
        picks = [prompts[order[(rnd * cfg.round_prompts + i) % len(order)]] for i in range(cfg.round_prompts)]
        rows = pack(member_answers(member, tokenizer, picks, cfg, seed=cfg.seed * 10_007 + rnd), heal_cfg.seq_len)
        budget = min(len(rows) * heal_cfg.seq_len, cfg.tokens - done)
        result = heal(member, rows, replace(heal_cfg, tokens=budget, distill_weight=1.0, seed=heal_cfg.seed + rnd), teacher=parent, progress=False)
        results.append(result)
        done += result.tokens
        rnd += 1
        bar.update(result.tokens)
        bar.set_postfix(rounds=rnd, kl=f"{result.final_loss:.3f}")
    bar.close()
    return results
