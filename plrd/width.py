"""Width pruning of the MLP: a member keeps the intermediate neurons that carry most of the output.

Low rank on SmolLM2's near-square projections must drop many directions before it saves a parameter
(a rank-r pair costs r·(in + out): break-even at half the full rank for q and o, 73% for the MLP
matrices), so a 0.9 member already throws away much of what every factored matrix does. Removing one
intermediate neuron of an MLP (a row of gate and up, a column of down) saves 3·hidden parameters
outright, and most neurons contribute little to the output on real inputs. Every layer keeps the
same number of neurons, so a member is an ordinary Llama with a smaller `intermediate_size`, saved as
one (`LlamaForCausalLM`): transformers and vLLM serve it with their own Llama, fused q/k/v and gate/up
matmuls included, and no plugin. (Per-layer widths from a global ranking of the neurons, by this score
times the layer's output sensitivity or by a per-neuron Fisher score, were tried on SmolLM2-135M in a
one-off experiment: after the refit they were further from the parent than the uniform width.)

A neuron's score is the output energy it adds through down_proj on calibration data:
‖down[:, j]‖² · E[h_j²] (h: down_proj's input, whose Gram `collect_grams` already has). The kept
neurons are then refit with the rest of the member to the parent (plrd/refit.py): gate and up to the
parent's rows for those neurons, down to the parent's whole output from the fewer neurons (least
squares, so what the dropped ones did is partly taken over by correlated kept ones).

Each member is cut from the previous one; `neurons` maps every member neuron back to the parent's
(kept in the member's folder, mlp_neurons.json), which the refit needs to find its targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaForCausalLM

from family.errors import FamilyError
from family.lowrank import LowRankLinear, LowRankLlamaForCausalLM, llama_config_from, lowrank_config_from
from family.storage import atomic_write_text
from plrd.factorize import count_parameters

NEURONS_FILE = "mlp_neurons.json"  # per layer, the parent's index of each of the member's MLP neurons

# Layer index → the parent's neuron index of each of the member's neurons.
Neurons = list[torch.Tensor]


def parent_neurons(model: nn.Module) -> Neurons:
    """The identity map of a model that is not pruned."""
    return [torch.arange(layer.mlp.down_proj.in_features) for layer in model.model.layers]


def width_for(model: nn.Module, target: float, parent_parameters: int) -> int:
    """The MLP width (the same in every layer) that brings `model` to `target` of the parent's parameters."""
    cfg = model.config
    per_neuron = 3 * cfg.hidden_size * cfg.num_hidden_layers
    excess = count_parameters(model) - target * parent_parameters
    width = cfg.intermediate_size - round(excess / per_neuron)
    if width < 1:
        raise FamilyError(f"target {target} is below what MLP width pruning alone can reach (it keeps attention and the embedding)")
    return min(width, cfg.intermediate_size)


def neuron_scores(model: nn.Module, grams: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer: each neuron's output energy through down_proj, ‖down[:, j]‖² · (HᵀH)_jj."""
    scores = []
    for i, layer in enumerate(model.model.layers):
        down = layer.mlp.down_proj
        if isinstance(down, LowRankLinear):
            raise FamilyError("width pruning needs dense MLPs: cut a width family from a dense parent, not from a low-rank member")
        energy = down.weight.detach().double().pow(2).sum(0)
        scores.append(energy * grams[f"model.layers.{i}.mlp.down_proj"].diagonal())
    return scores


@torch.no_grad()
def prune_width(model: nn.Module, width: int, grams: dict[str, torch.Tensor], neurons: Neurons) -> tuple[LlamaForCausalLM, Neurons]:
    """`model` with every MLP narrowed to its `width` highest-scoring neurons (kept in their order),
    and the parent's index of each kept neuron. A plain Llama unless `model` has factored projections."""
    scores = neuron_scores(model, grams)  # refuses low-rank MLPs
    if any(getattr(layer.mlp, p).bias is not None for layer in model.model.layers for p in ("gate_proj", "up_proj", "down_proj")):
        raise FamilyError("width pruning supports MLPs without biases (Llama's)")
    state = dict(model.state_dict())
    kept_in_parent = []
    for i, (score, parent_index) in enumerate(zip(scores, neurons)):
        keep = torch.topk(score, width).indices.sort().values
        mlp = f"model.layers.{i}.mlp"
        for name in ("gate_proj", "up_proj"):
            state[f"{mlp}.{name}.weight"] = state[f"{mlp}.{name}.weight"][keep].contiguous()
        state[f"{mlp}.down_proj.weight"] = state[f"{mlp}.down_proj.weight"][:, keep].contiguous()
        kept_in_parent.append(parent_index[keep])
    ranks = getattr(model.config, "ranks", None) or {}
    if ranks:
        config, cls = lowrank_config_from(model.config, ranks), LowRankLlamaForCausalLM
    else:
        config, cls = llama_config_from(model.config), LlamaForCausalLM
    config.intermediate_size = width
    member = cls(config).to(next(model.parameters()).dtype)
    member.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        member.tie_weights()
    member.generation_config = model.generation_config
    return member.eval(), kept_in_parent


def refit_rows(neurons: Neurons) -> dict[str, torch.Tensor]:
    """For `sequential_refit`: the parent's output rows that each pruned gate/up projection reproduces."""
    return {f"model.layers.{i}.mlp.{p}": index for i, index in enumerate(neurons) for p in ("gate_proj", "up_proj")}


def write_neurons(member_dir: Path, neurons: Neurons) -> None:
    """Record the map in the member's folder (its own file: it is build state, not routing metadata)."""
    atomic_write_text(Path(member_dir) / NEURONS_FILE, json.dumps([index.tolist() for index in neurons]) + "\n")


def read_neurons(member_dir: Path, model: nn.Module, parent: nn.Module) -> Neurons:
    """A member's recorded neuron map; none recorded means the parent's width, every neuron its own."""
    path = Path(member_dir) / NEURONS_FILE
    if not path.is_file():
        if model.config.intermediate_size != parent.config.intermediate_size:
            raise FamilyError(f"{member_dir}: the MLP is narrower than the parent's but {NEURONS_FILE} is missing")
        return parent_neurons(model)
    try:
        neurons = [torch.tensor(index, dtype=torch.long) for index in json.loads(path.read_text())]
    except (ValueError, TypeError) as e:  # not JSON, or not lists of integers
        raise FamilyError(f"{path} is unreadable ({e}): rebuild this member") from None
    if len(neurons) != len(model.model.layers) or any(len(n) != layer.mlp.down_proj.in_features for n, layer in zip(neurons, model.model.layers)):
        raise FamilyError(f"{path} does not match the member's weights")
    return neurons
