"""Batched generation with `transformers`, for making the distillation corpus and for evaluation.

`chat_prompt_ids` applies the member's own chat template, so every member is asked exactly what a
client of the gateway would ask. `generate` left-pads a batch and returns only the new tokens of
each row, cut after the end-of-turn token. Sampling can start greedy: the first `greedy_tokens`
tokens take the argmax and the rest are sampled (as in LLM-QAT's data-free distillation), so that
answers open the way the parent most likely opens them and still vary after that.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList


def chat_prompt_ids(tokenizer, user_text: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _GreedyFirst(LogitsProcessor):
    """Keep only the argmax for the first `k` new tokens (sampling then picks it)."""

    def __init__(self, k: int, prompt_len: int):
        self.k, self.prompt_len = k, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.prompt_len >= self.k:
            return scores
        keep = scores.argmax(-1, keepdim=True)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, keep, scores.gather(-1, keep))


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, greedy_tokens: int | None = None,
    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
) -> list[list[int]]:
    """New token ids for each prompt (a batch). `greedy_tokens=None` (or ≥ max_new_tokens): all greedy.

    Deterministic for a seed and a batch: the generator is seeded here, and the batch is padded the
    same way every time.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    greedy = greedy_tokens is None or greedy_tokens >= max_new_tokens
    kwargs = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
        logits_processor=LogitsProcessorList([_GreedyFirst(greedy_tokens, width)]) if greedy_tokens else None,
    )
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
        eos_token_id=eos, **kwargs,
    )
    result = []
    for row in out[:, width:].tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        result.append(row)
    return result
