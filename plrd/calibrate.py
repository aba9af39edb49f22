"""Calibration: the Gram matrix XᵀX of the inputs of every factorable projection.

Whitened SVD (SVD-LLM) truncates W·S, where S is the Cholesky factor of XᵀX, so that what is thrown
away is the error on the *outputs* the model actually produces, not on the weights. Projections that
read the same input (q/k/v, gate/up) share one Gram matrix.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm import tqdm

from family.lowrank import PROJECTIONS

# Projections whose input is the same tensor: the key's Gram serves the others too.
SHARED_INPUT = {
    "self_attn.q_proj": ("self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_proj": ("mlp.up_proj",),
    "self_attn.o_proj": (),
    "mlp.down_proj": (),
}


@torch.no_grad()
def collect_grams(model: nn.Module, sequences: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run `sequences` (N × L token ids) through `model`; return module path → XᵀX (float64, in × in)."""
    grams: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(path: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            g = (x.T @ x).double()  # float32 product per batch (10x faster than float64), float64 sum
            if path in grams:
                grams[path] += g
            else:
                grams[path] = g

        return hook

    num_layers = model.config.num_hidden_layers
    for i in range(num_layers):
        for key in SHARED_INPUT:
            path = f"model.layers.{i}.{key}"
            hooks.append(model.get_submodule(path).register_forward_hook(hook_for(path)))
    model.eval()
    try:
        tokens = sequences.numel()
        bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="calibrate", disable=not progress)
        start = time.perf_counter()
        for b in range(0, len(sequences), batch_size):
            batch = sequences[b : b + batch_size]
            model(input_ids=batch, use_cache=False)
            bar.update(batch.numel())
            bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start):.0f}")
        bar.close()
    finally:
        for h in hooks:
            h.remove()
    for i in range(num_layers):
        for key, sharers in SHARED_INPUT.items():
            for other in sharers:
                grams[f"model.layers.{i}.{other}"] = grams[f"model.layers.{i}.{key}"]
    assert all(f"model.layers.{i}.{p}" in grams for i in range(num_layers) for p in PROJECTIONS)
    return grams
