"""How much each projection's output matters to the model's prediction: for rank allocation.

Dropping a direction of a projection adds an error e to its output; to second order the loss grows
by ½·eᵀFe, with F the Fisher information of that output. With F taken as isotropic, s·I, where s is
the mean squared gradient of the loss per output element, the cost of dropping whitened direction k
of matrix i is about ½·s_i·σ²_ik (σ²_ik: the output energy of that direction on calibration data).
That ranks directions *across* matrices by their measured effect on the model's output, where the
relative energy alone treats every matrix as equally important. The loss is the LM loss on the
parent's own samples, whose expected squared gradient is the Fisher information (KL to the parent
has zero gradient at the parent).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm import tqdm

from family.lowrank import projection_paths


def output_sensitivity(model: nn.Module, rows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict[str, float]:
    """Module path → mean squared gradient of the LM loss per output element, over `rows`."""
    paths = projection_paths(model.config.num_hidden_layers)
    total = {p: 0.0 for p in paths}
    count = {p: 0 for p in paths}
    handles = []

    def on_output(path: str):
        def hook(_module, _inputs, output):
            def grad_hook(g):
                total[path] += g.detach().float().pow(2).sum().item()
                count[path] += g.numel()

            output.register_hook(grad_hook)

        return hook

    for p in paths:
        handles.append(model.get_submodule(p).register_forward_hook(on_output(p)))
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    bar = tqdm(total=rows.numel(), unit="tok", unit_scale=True, desc="sensitivity", disable=not progress)
    start = time.perf_counter()
    try:
        for b in range(0, len(rows), batch_size):
            batch = rows[b : b + batch_size]
            embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)  # gradients flow without weight grads
            out = model(inputs_embeds=embeds, labels=batch, use_cache=False)
            out.loss.backward()
            bar.update(batch.numel())
            bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start):.0f}")
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return {p: total[p] / max(1, count[p]) for p in paths}
