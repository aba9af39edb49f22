"""Sequential refit: every projection refit to the parent's outputs, layer by layer, in closed form."""

import copy

import torch
import torch.nn.functional as F

from family import defaults
from plrd.calibrate import collect_grams
from family.text import pack, tokenize
from plrd.factorize import count_parameters, factorize, full_rank_member
from plrd.refit import sequential_refit


def _kl(parent, member, rows) -> float:
    with torch.no_grad():
        p = F.log_softmax(parent(input_ids=rows).logits.float(), -1)
        q = F.log_softmax(member(input_ids=rows).logits.float(), -1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean").item() / rows.shape[1]


def test_refit_of_a_full_rank_member_is_the_parent(tiny, calib_rows):
    parent, _ = tiny
    member = full_rank_member(parent, None)
    with torch.no_grad():  # start it away from the parent: the refit must bring it back
        for p in member.parameters():
            if p.dim() == 2 and p.shape[0] != parent.config.vocab_size:
                p.add_(0.05 * torch.randn_like(p))
    sequential_refit(parent, member, calib_rows, damping=1e-8, progress=False)
    with torch.no_grad():
        a, b = parent(input_ids=calib_rows[:2]).logits, member(input_ids=calib_rows[:2]).logits
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()


def test_refit_leaves_a_member_that_is_already_the_parent_as_it_is(tiny, calib_rows):
    # The damping pulls towards the member's own weights, not towards zero: a projection whose inputs
    # and weights are the parent's has nothing to fix, whatever the damping.
    parent, _ = tiny
    member = copy.deepcopy(parent)
    sequential_refit(parent, member, calib_rows, damping=1.0, progress=False)
    for (name, a), b in zip(parent.named_parameters(), member.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_refit_keeps_the_ranks_and_is_closer_to_the_parent_than_the_svd(tiny, calib_rows):
    parent, tok = tiny
    grams = collect_grams(parent, calib_rows, progress=False)
    svd = factorize(parent, 0.6, count_parameters(parent), grams=grams, progress=False)
    refit = copy.deepcopy(svd)
    errors = sequential_refit(parent, refit, calib_rows, progress=False)
    assert refit.config.ranks == svd.config.ranks and count_parameters(refit) == count_parameters(svd)
    assert set(errors) == {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    held_out = pack(tokenize(tok, defaults.EVAL_TEXT.read_text(encoding="utf-8")), 64, 4)  # text the refit never saw
    assert _kl(parent, refit, calib_rows) < _kl(parent, svd, calib_rows)
    assert _kl(parent, refit, held_out) < 1.5 * _kl(parent, svd, held_out)  # no wild overfit either


def test_block_refinement_runs_and_keeps_the_member_close_to_the_parent(tiny, calib_rows):
    parent, _ = tiny
    member = factorize(parent, 0.6, count_parameters(parent), grams=collect_grams(parent, calib_rows, progress=False), progress=False)
    sequential_refit(parent, member, calib_rows, refine_epochs=2, progress=False)
    assert all(p.grad is None for p in member.parameters())  # no gradients left behind
    assert _kl(parent, member, calib_rows) < 1.0
