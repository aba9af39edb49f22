"""Healing lowers the LM loss of a truncated member, and distillation pulls it toward the teacher."""

import torch

from plrd.calibrate import collect_grams
from plrd.factorize import count_parameters, factorize
from family.hardware import bf16_is_fast
from plrd.heal import HealConfig, heal
from family.text import pack


def _loss(model, rows) -> float:
    with torch.no_grad():
        return model(input_ids=rows, labels=rows).loss.item()


def test_healing_lowers_held_out_loss_and_trains_only_the_factors(tiny, calib_ids, calib_rows):
    model, _ = tiny
    member = factorize(model, 0.6, count_parameters(model), grams=collect_grams(model, calib_rows, progress=False), progress=False)
    train_rows, held_out = pack(calib_ids[:-4096], 128), pack(calib_ids[-4096:], 128)
    embed_before = member.model.embed_tokens.weight.clone()
    before = _loss(member, held_out)
    result = heal(member, train_rows, HealConfig(tokens=60_000, seq_len=128, lr=3e-3, train="factors"), progress=False)
    assert result.tokens >= 60_000 and result.steps > 0
    assert _loss(member, held_out) < before
    torch.testing.assert_close(member.model.embed_tokens.weight, embed_before)  # not a factor: untouched


def test_distillation_runs_with_the_parent_as_teacher(tiny, calib_rows):
    model, _ = tiny
    member = factorize(model, 0.6, count_parameters(model), grams=None, progress=False)
    result = heal(member, calib_rows, HealConfig(tokens=4096, seq_len=128, distill_weight=0.5), teacher=model, progress=False)
    assert result.final_loss == result.final_loss  # not NaN


def test_bf16_is_used_by_default_only_where_the_hardware_does_it_natively(tiny, calib_rows):
    model, _ = tiny
    member = factorize(model, 0.6, count_parameters(model), grams=None, progress=False)
    auto = heal(member, calib_rows, HealConfig(tokens=256, seq_len=128, batch_size=2, grad_accum=1), progress=False)
    assert auto.bf16 == bf16_is_fast()
    forced = heal(member, calib_rows, HealConfig(tokens=256, seq_len=128, batch_size=2, grad_accum=1, bf16=False), progress=False)
    assert forced.bf16 is False
