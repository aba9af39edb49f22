"""Truncated SVD: exact at full rank, on target in parameters, and whitening pays off."""

import pytest
import torch

from family.errors import FamilyError
from family.lowrank import PROJECTIONS, LowRankLinear
from plrd.calibrate import collect_grams
from plrd.factorize import count_parameters, factorize, full_rank_member


@pytest.fixture(scope="module")
def grams(tiny, calib_rows):
    return collect_grams(tiny[0], calib_rows, progress=False)


@pytest.mark.parametrize("whitened", [False, True])
def test_full_rank_factorization_reproduces_the_parent(tiny, grams, calib_rows, whitened):
    model, _ = tiny
    member = full_rank_member(model, grams if whitened else None)
    assert all(isinstance(member.get_submodule(p), LowRankLinear) for p in member.config.ranks)
    x = calib_rows[:2]
    with torch.no_grad():
        torch.testing.assert_close(member(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("allocation", ["allocated", "uniform"])
@pytest.mark.parametrize("target", [0.9, 0.75, 0.6, 0.45])
def test_parameter_count_hits_the_target_within_one_percent(tiny, grams, allocation, target):
    model, _ = tiny
    parent_params = count_parameters(model)
    member = factorize(model, target, parent_params, grams=grams, allocation=allocation, progress=False)
    achieved = count_parameters(member) / parent_params
    assert abs(achieved - target) <= 0.01 * target
    assert achieved <= target + 1e-9  # never above budget


def _output_error(model, member, rows) -> float:
    with torch.no_grad():
        return torch.nn.functional.mse_loss(member(rows).logits, model(rows).logits).item()


def test_whitened_svd_beats_plain_svd_on_real_text(tiny, grams, calib_rows):
    model, _ = tiny
    parent_params = count_parameters(model)
    whitened = factorize(model, 0.6, parent_params, grams=grams, allocation="uniform", progress=False)
    plain = factorize(model, 0.6, parent_params, grams=None, allocation="uniform", progress=False)
    rows = calib_rows[8:12]
    assert _output_error(model, whitened, rows) < _output_error(model, plain, rows)


def test_allocation_gives_unequal_ranks_where_truncation_costs_differ(tiny, grams):
    model, _ = tiny
    member = factorize(model, 0.6, count_parameters(model), grams=grams, allocation="allocated", progress=False)
    fractions = {p: r / min(member.get_submodule(p).in_features, member.get_submodule(p).out_features) for p, r in member.config.ranks.items()}
    assert len(set(round(f, 3) for f in fractions.values())) > 1


@pytest.mark.parametrize(
    "target, words",
    [(0.01, "impossible"), (0.2, "embeddings and norms alone"), (1.5, "out of range"), (0.0, "out of range"),
     (float("nan"), "out of range"), ("abc", "not a number")],
)
def test_impossible_targets_are_refused_with_a_reason(tiny, grams, target, words):
    model, _ = tiny
    with pytest.raises(FamilyError, match=words):
        factorize(model, target, count_parameters(model), grams=grams, progress=False)


def test_a_member_can_be_factorized_again_at_a_lower_target(tiny, grams, calib_rows):
    model, _ = tiny
    parent_params = count_parameters(model)
    first = factorize(model, 0.8, parent_params, grams=grams, progress=False)
    second = factorize(first, 0.6, parent_params, grams=collect_grams(first, calib_rows, progress=False), progress=False)
    assert abs(count_parameters(second) / parent_params - 0.6) <= 0.006
    assert all(second.config.ranks[p] <= first.config.ranks.get(p, 10**9) for p in second.config.ranks)


def test_a_matrix_past_break_even_stays_dense_and_factored_ones_save_parameters(tiny, grams):
    model, _ = tiny
    member = factorize(model, 0.95, count_parameters(model), grams=grams, allocation="allocated", progress=False)
    paths = [f"model.layers.{i}.{p}" for i in range(model.config.num_hidden_layers) for p in PROJECTIONS]
    dense = [p for p in paths if p not in member.config.ranks]
    assert dense and all(isinstance(member.get_submodule(p), torch.nn.Linear) for p in dense)
    for path, rank in member.config.ranks.items():
        m = member.get_submodule(path)
        assert rank * (m.in_features + m.out_features) < m.in_features * m.out_features
