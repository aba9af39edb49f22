"""Rank allocation by measured effect on the output: sensitivities, then ranks that meet the budget."""

import pytest

from family.errors import FamilyError
from plrd.calibrate import collect_grams
from plrd.factorize import choose_ranks, count_parameters, factorize, projection_budget, spectra
from plrd.sensitivity import output_sensitivity


def test_every_projection_gets_a_positive_sensitivity_and_weights_stay_untouched(tiny, calib_rows):
    model, _ = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sens = output_sensitivity(model, calib_rows[:4], progress=False)
    assert len(sens) == 2 * 7 and all(v > 0 for v in sens.values())
    assert all(p.grad is None and (p.detach() == before[n]).all() for n, p in model.named_parameters())


def test_sensitivity_allocation_meets_the_budget_and_follows_the_weights(tiny, calib_rows):
    model, _ = tiny
    specs = spectra(model, collect_grams(model, calib_rows, progress=False), progress=False)
    budget = projection_budget(model, 0.6, count_parameters(model))
    sens = output_sensitivity(model, calib_rows[:4], progress=False)
    ranks = choose_ranks(specs, budget, "sensitivity", sens)
    assert sum(s.cost(ranks[s.path]) for s in specs) <= budget
    # Make one matrix 1000x more important: it can only gain rank.
    hot = specs[3].path
    boosted = choose_ranks(specs, budget, "sensitivity", {**sens, hot: sens[hot] * 1000})
    assert boosted[hot] >= ranks[hot] and boosted != ranks
    with pytest.raises(FamilyError, match="sensitivit"):
        choose_ranks(specs, budget, "sensitivity", None)
    member = factorize(model, 0.6, count_parameters(model), grams=None, specs=specs, allocation="sensitivity", sensitivity=sens, progress=False)
    assert count_parameters(member) <= 0.6 * count_parameters(model) * 1.01
