"""On-policy distillation: the member answers prompts itself, and training on those answers pulls its
distribution toward the parent's in the states it reaches on its own."""

import copy

import pytest
import torch
import torch.nn.functional as F

from family.generate import chat_prompt_ids
from plrd.heal import HealConfig
from plrd.onpolicy import OnPolicyConfig, distill_on_policy, member_answers

PROMPTS = ["What is the capital of Japan?", "Write a haiku about rain.", "How do I sort a list in Python?",
           "Name three colours.", "Why is the sky blue?", "Give me a word that rhymes with cat."]


@pytest.fixture
def member(tiny):
    """The parent with noise added to every decoder weight: a member that has drifted."""
    parent, _ = tiny
    m = copy.deepcopy(parent)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.model.layers.parameters():
            p.add_(p.std() * torch.randn(p.shape, generator=g))
    return m


def _kl_on(parent, member, ids: torch.Tensor) -> float:
    with torch.no_grad():
        p = F.log_softmax(parent(input_ids=ids[None]).logits.float(), -1)
        q = F.log_softmax(member(input_ids=ids[None]).logits.float(), -1)
    return F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean().item()


def test_answers_are_the_prompts_followed_by_sampled_tokens_and_repeat_for_a_seed(tiny, member):
    _, tok = tiny
    prompts = [chat_prompt_ids(tok, p) for p in PROMPTS[:3]]
    cfg = OnPolicyConfig(tokens=0, max_new_tokens=8, batch_size=2)
    a = member_answers(member, tok, prompts, cfg, seed=3)
    assert a.tolist() == member_answers(member, tok, prompts, cfg, seed=3).tolist()
    assert a.tolist() != member_answers(member, tok, prompts, cfg, seed=4).tolist()  # sampled, not greedy
    assert a[: len(prompts[0])].tolist() == prompts[0]
    assert len(prompts[0]) < len(a) <= sum(len(p) for p in prompts) + 3 * 8
    greedy = OnPolicyConfig(tokens=0, max_new_tokens=8, batch_size=2, temperature=0)  # its greedy answers: no seed matters
    assert member_answers(member, tok, prompts, greedy, seed=3).tolist() == member_answers(member, tok, prompts, greedy, seed=4).tolist()


def test_distilling_on_its_own_answers_brings_the_member_closer_to_the_parent_there(tiny, member):
    parent, tok = tiny
    prompts = [chat_prompt_ids(tok, p) for p in PROMPTS]
    own = member_answers(member, tok, prompts, OnPolicyConfig(tokens=0, max_new_tokens=24), seed=99)
    before = _kl_on(parent, member, own)
    cfg = OnPolicyConfig(tokens=3_000, round_prompts=6, max_new_tokens=24)
    results = distill_on_policy(member, parent, tok, prompts, cfg, HealConfig(tokens=0, seq_len=64, batch_size=1, lr=1e-3, train="blocks"), progress=False)
    assert len(results) > 1  # several rounds: later answers come from the improved member
    assert sum(r.tokens for r in results) >= cfg.tokens
    assert _kl_on(parent, member, own) < 0.6 * before
    assert not any(p.requires_grad for p in member.parameters())
