"""Width pruning: a member keeps each MLP's highest-scoring neurons, knows which of the parent's they
are, is refit to the parent, and is an ordinary model on disk."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from family import defaults
from family.errors import FamilyError
from plrd.build import BuildConfig, build_family
from plrd.calibrate import collect_grams
from plrd.factorize import count_parameters, factorize
from plrd.heal import HealConfig
from plrd.refit import sequential_refit
from plrd.width import NEURONS_FILE, neuron_scores, parent_neurons, prune_width, read_neurons, refit_rows, width_for, write_neurons


def _kl(parent, member, rows) -> float:
    with torch.no_grad():
        p = F.log_softmax(parent(input_ids=rows).logits.float(), -1)
        q = F.log_softmax(member(input_ids=rows).logits.float(), -1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean").item() / rows.shape[1]


@pytest.fixture(scope="module")
def grams(tiny, calib_rows):
    return collect_grams(tiny[0], calib_rows, progress=False)


def test_keeping_every_neuron_is_the_parent(tiny, grams, calib_rows):
    parent, _ = tiny
    member, neurons = prune_width(parent, parent.config.intermediate_size, grams, parent_neurons(parent))
    assert [n.tolist() for n in neurons] == [list(range(parent.config.intermediate_size))] * parent.config.num_hidden_layers
    with torch.no_grad():
        assert torch.allclose(parent(input_ids=calib_rows[:2]).logits, member(input_ids=calib_rows[:2]).logits, atol=1e-5)


def test_the_width_hits_the_parameter_target_and_the_lowest_scoring_neurons_go(tiny, grams):
    parent, _ = tiny
    P = count_parameters(parent)
    width = width_for(parent, 0.8, P)
    member, neurons = prune_width(parent, width, grams, parent_neurons(parent))
    assert member.config.intermediate_size == width < parent.config.intermediate_size
    assert abs(count_parameters(member) / P - 0.8) < 3 * 3 * parent.config.hidden_size * 2 / P  # within a neuron per layer
    for score, kept in zip(neuron_scores(parent, grams), neurons):
        dropped = sorted(set(range(len(score))) - set(kept.tolist()))
        assert score[kept].min() >= score[dropped].max()
        assert kept.tolist() == sorted(kept.tolist())  # kept in the parent's order


def test_a_neuron_that_adds_nothing_to_the_output_is_pruned_first(tiny, grams):
    parent, _ = tiny
    silent = {0: [3, 70], 1: [5]}
    with torch.no_grad():
        for layer, cols in silent.items():
            saved = parent.model.layers[layer].mlp.down_proj.weight[:, cols].clone()
            parent.model.layers[layer].mlp.down_proj.weight[:, cols] = 0.0
            try:
                _, neurons = prune_width(parent, parent.config.intermediate_size - 2, grams, parent_neurons(parent))
            finally:
                parent.model.layers[layer].mlp.down_proj.weight[:, cols] = saved
            assert not set(cols) & set(neurons[layer].tolist())


def test_a_member_cut_from_a_member_maps_its_neurons_to_the_parents(tiny, grams, calib_rows):
    parent, _ = tiny
    first, n1 = prune_width(parent, 100, grams, parent_neurons(parent))
    second, n2 = prune_width(first, 80, collect_grams(first, calib_rows, progress=False), n1)
    for i, index in enumerate(n2):
        assert set(index.tolist()) <= set(n1[i].tolist())
        rows = parent.model.layers[i].mlp.gate_proj.weight[index]  # before any refit the weights are the parent's own rows
        assert torch.equal(second.model.layers[i].mlp.gate_proj.weight, rows)


def test_the_refit_brings_a_pruned_member_closer_to_the_parent(tiny, grams, calib_rows):
    parent, _ = tiny
    pruned, neurons = prune_width(parent, 80, grams, parent_neurons(parent))
    refit, _ = prune_width(parent, 80, grams, parent_neurons(parent))
    sequential_refit(parent, refit, calib_rows, output_rows=refit_rows(neurons), progress=False)
    assert refit.config.intermediate_size == 80
    assert _kl(parent, refit, calib_rows) < 0.8 * _kl(parent, pruned, calib_rows)


def test_recorded_neurons_round_trip_and_a_mismatch_is_refused(tiny, grams, tmp_path):
    parent, _ = tiny
    member, neurons = prune_width(parent, 90, grams, parent_neurons(parent))
    with pytest.raises(FamilyError, match="mlp_neurons.json is missing"):
        read_neurons(tmp_path, member, parent)  # narrower than the parent, nothing recorded
    write_neurons(tmp_path, neurons)
    assert all(torch.equal(a, b) for a, b in zip(neurons, read_neurons(tmp_path, member, parent)))
    write_neurons(tmp_path, [n[:-1] for n in neurons])
    with pytest.raises(FamilyError, match="does not match"):
        read_neurons(tmp_path, member, parent)
    for junk in ("{not json", '[["a", "b"]]'):
        (tmp_path / NEURONS_FILE).write_text(junk)
        with pytest.raises(FamilyError, match="unreadable"):
            read_neurons(tmp_path, member, parent)


def test_a_low_rank_mlp_cannot_be_width_pruned(tiny, grams):
    parent, _ = tiny
    member = factorize(parent, 0.6, count_parameters(parent), grams=grams, progress=False)
    if not any(".mlp.down_proj" in p for p in member.config.ranks):
        pytest.skip("the allocation left every down_proj dense")
    with pytest.raises(FamilyError, match="dense MLPs"):
        prune_width(member, 50, collect_grams(member, torch.zeros(1, 8, dtype=torch.long), progress=False), parent_neurons(member))


def test_build_with_method_width_writes_narrow_dense_members_and_resumes_from_them(tiny_parent_dir, tmp_path):
    def config(targets):
        return BuildConfig(
            parent=tiny_parent_dir, targets=targets, calib=str(defaults.WIKITEXT_VALID), out=tmp_path, name="tiny",
            heal=HealConfig(tokens=512, seq_len=64, batch_size=2, grad_accum=1), method="width", calib_sequences=8,
            calib_seq_len=128, command="test",
        )

    build_family(config([0.85]), progress=False)
    first = tmp_path / "tiny-p85"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    build_family(config([0.85, 0.7]), progress=False)  # the second member is cut from the first, loaded from disk
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp

    parent = AutoModelForCausalLM.from_pretrained(tiny_parent_dir)
    p1, p2 = (json.loads((tmp_path / m / "provenance.json").read_text()) for m in ("tiny-p85", "tiny-p70"))
    assert p1["method"] == p2["method"] == "width-pruning" and p2["derived_from"] == "tiny-p85"
    n1, n2 = (json.loads((tmp_path / m / NEURONS_FILE).read_text()) for m in ("tiny-p85", "tiny-p70"))
    for name, neurons, target in (("tiny-p85", n1, 0.85), ("tiny-p70", n2, 0.7)):
        member = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        # A plain Llama on disk (vLLM and transformers serve it with their own Llama, no plugin).
        assert member.config.model_type == "llama" and type(member).__name__ == "LlamaForCausalLM"
        assert member.config.intermediate_size < parent.config.intermediate_size
        assert abs(count_parameters(member) / count_parameters(parent) - target) < 0.02
        assert [len(n) for n in neurons] == [member.config.intermediate_size] * member.config.num_hidden_layers
    assert all(set(b) <= set(a) for a, b in zip(n1, n2))
    registry = json.loads((tmp_path / "family.json").read_text())
    assert "mlp_neurons" not in json.dumps(registry)  # the registry stays small
    assert {m["architecture"] for m in registry["members"]} == {"LlamaForCausalLM"}
