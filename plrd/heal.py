"""Healing: continual pretraining of a freshly factorized member, optionally distilled from a teacher.

The loss is the LM loss on packed text, mixed with KL(teacher ‖ student) on temperature-softened
logits when a teacher (the parent, or the previous member) is given. AdamW with warm-up and a cosine
schedule, gradient accumulation, a token budget, bf16 autocast. `accelerate` owns devices and
processes, so `accelerate launch -m family.cli build ...` runs the same loop data-parallel on one or
many GPUs, and plain `family build` runs it on the CPU.

bf16 autocast is used where the hardware computes in bf16 natively (`family.hardware.bf16_is_fast`; it
is emulated, and much slower than fp32, elsewhere). Autocast keeps fp32 master weights either way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from family import defaults
from family.errors import FamilyError
from family.hardware import bf16_is_fast
from family.lowrank import LowRankLinear
from family.vocab_map import VocabMap
from plrd.vocab import teacher_logprobs


@dataclass
class HealConfig:
    tokens: int  # token budget (sequences × seq_len × steps)
    seq_len: int = defaults.HEAL_SEQ_LEN
    batch_size: int = defaults.HEAL_BATCH  # sequences per micro-batch (per process)
    grad_accum: int = defaults.HEAL_GRAD_ACCUM
    lr: float = defaults.HEAL_LR
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    train: str = defaults.HEAL_TRAIN  # "factors": only LowRankLinear factors; "blocks": every decoder-layer parameter; "all": every parameter
    distill_weight: float = 0.0  # 0 = pure LM loss; 1 = pure KL to the teacher
    temperature: float = 1.0
    hidden_weight: float = 0.0  # with a teacher: weight of the hidden-state MSE (every layer's output, scaled by the teacher's variance)
    bf16: bool | None = None  # None: bf16 autocast where the hardware does bf16 natively (bf16_is_fast)
    seed: int = 0


@dataclass
class HealResult:
    steps: int
    tokens: int
    seconds: float
    first_loss: float
    final_loss: float  # mean over the last 10% of steps
    losses: list[float] = field(default_factory=list, repr=False)  # the objective per optimizer step (the curve)
    bf16: bool = False  # whether bf16 autocast was used


def _trainable(model: nn.Module, train: str) -> list[nn.Parameter]:
    if train == "all":
        params = list(model.parameters())
    elif train == "blocks":
        params = [p for layer in model.model.layers for p in layer.parameters()]
    elif train == "factors":
        params = [p for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]
        if not params:
            raise FamilyError("--train factors: this model has no factored projections to train")
    else:
        raise FamilyError(f"unknown --train {train!r} (factors, blocks or all)")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) per token on softened distributions, scaled by T² (Hinton et al.)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    q = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s, q, log_target=True, reduction="none").sum(-1).mean() * t * t


def hidden_mse(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over layers of MSE(student, teacher) / Var(teacher): every layer's output pulled toward
    the parent's, each on its own scale (the residual stream grows with depth)."""
    terms = [F.mse_loss(s.float(), t.float()) / t.float().var().clamp_min(1e-6) for s, t in zip(student_hidden[1:], teacher_hidden[1:])]
    return torch.stack(terms).mean()


def heal(
    model: nn.Module,
    sequences: torch.Tensor,
    cfg: HealConfig,
    teacher: nn.Module | None = None,
    progress: bool = True,
    vocab: VocabMap | None = None,
) -> HealResult:
    """Train `model` in place on rows of `sequences` (N × seq_len) until `cfg.tokens` are seen.
    `vocab` (family/vocab_map.py): the member's vocabulary is the teacher's trimmed; the teacher reads
    the same tokens in its own ids, and its distribution is summed onto the member's ids before the KL."""
    if cfg.tokens <= 0:
        return HealResult(0, 0, 0.0, float("nan"), float("nan"))
    if (cfg.distill_weight > 0 or cfg.hidden_weight > 0) and teacher is None:
        raise FamilyError("distillation asked for, but no teacher model given")
    # One process may heal several members with different settings; keep the distributed state
    # (PartialState), forget the previous run's mixed-precision choice.
    AcceleratorState._reset_state(reset_partial_state=False)
    use_bf16 = bf16_is_fast() if cfg.bf16 is None else cfg.bf16
    accelerator = Accelerator(
        mixed_precision="bf16" if use_bf16 else "no",
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=not torch.cuda.is_available(),
    )
    torch.manual_seed(cfg.seed)
    params = _trainable(model, cfg.train)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * accelerator.num_processes
    steps = max(1, math.ceil(cfg.tokens / tokens_per_step))
    rows_needed = steps * cfg.grad_accum * cfg.batch_size * accelerator.num_processes
    rows = sequences[torch.arange(rows_needed) % len(sequences)]  # cycle the data if the budget exceeds it
    loader = torch.utils.data.DataLoader(rows, batch_size=cfg.batch_size, shuffle=False)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_frac * steps), steps)  # no warm-up step when steps < 20: its lr would be 0
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if teacher is not None:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
        teacher.eval()
    model.train()

    losses: list[float] = []
    bar = tqdm(total=steps * tokens_per_step, unit="tok", unit_scale=True, desc="heal", disable=not (progress and accelerator.is_main_process))
    start = time.perf_counter()
    for batch in loader:
        with accelerator.accumulate(model):
            want_hidden = teacher is not None and cfg.hidden_weight > 0
            out = model(input_ids=batch, labels=batch, use_cache=False, output_hidden_states=want_hidden)
            loss = out.loss
            if teacher is not None and (cfg.distill_weight > 0 or want_hidden):
                with torch.no_grad():
                    t_ids = batch if vocab is None else vocab.parent_ids(batch)
                    t_out = teacher(input_ids=t_ids, use_cache=False, output_hidden_states=want_hidden)
                t_logits = teacher_logprobs(t_out.logits, vocab, cfg.temperature)
                kl = distill_kl(out.logits, t_logits, cfg.temperature)
                loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kl
                if want_hidden:
                    loss = loss + cfg.hidden_weight * hidden_mse(out.hidden_states, t_out.hidden_states)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            losses.append(loss.item())  # the objective: LM loss, KL, or their mix
        bar.update(batch.numel() * accelerator.num_processes)
        bar.set_postfix(loss=f"{loss.item():.3f}", lm=f"{out.loss.item():.3f}", tok_s=f"{bar.n / (time.perf_counter() - start):.0f}")
    bar.close()
    model.eval()
    for p in accelerator.unwrap_model(model).parameters():
        p.requires_grad_(False)
    tail = losses[-max(1, len(losses) // 10):]
    return HealResult(len(losses), steps * tokens_per_step, time.perf_counter() - start, losses[0], sum(tail) / len(tail), losses, use_bf16)
