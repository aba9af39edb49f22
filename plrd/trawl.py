"""TRAWL: tensor decomposition of weight matrices stacked across a layer or across layers.

Matrices of the same shape (the gate and up projections of one layer, or one projection over the last
K layers) are stacked into a 3-way tensor (slices × out × in) and decomposed with tensorly:
- Tucker: T ≈ G ×₀ U0 ×₁ U1 ×₂ U2, so each slice is W_i ≈ U1 · C_i · U2ᵀ with C_i = Σ_k U0[i,k] G[k];
- CP:     T ≈ Σ_k λ_k U0[:,k] ∘ U1[:,k] ∘ U2[:,k], so W_i ≈ U1 · diag(λ ⊙ U0[i]) · U2ᵀ.
`denoise` writes the reconstructed W_i back as dense weights (the paper's use: shared structure kept,
per-matrix noise dropped, no data and no training). `compress` keeps the factors: each slice is exactly
a low-rank pair (B = U1·C_i, A = U2ᵀ, or the other way round, whichever rank is smaller), saved as a
LowRankLlamaForCausalLM member that the same engines serve.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import tensorly as tl
import torch
from tensorly.decomposition import parafac, tucker
from torch import nn
from tqdm import tqdm

from family.errors import FamilyError
from family.lowrank import PROJECTIONS, LowRankLinear
from plrd.factorize import assemble

Decomposition = Literal["cp", "tucker"]
Strategy = Literal["layer", "cross-layer"]
MODULE_SETS = {
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
}


@dataclass
class TrawlConfig:
    decomposition: Decomposition = "tucker"
    rank: tuple[int, ...] = (64,)  # CP: (R,); Tucker: (r1=r2,) or (r0, r1, r2)
    strategy: Strategy = "cross-layer"
    modules: tuple[str, ...] = MODULE_SETS["mlp"]
    layers: tuple[int, ...] = ()
    mode: Literal["denoise", "compress"] = "denoise"
    seed: int = 0


def parse_modules(text: str) -> tuple[str, ...]:
    """'mlp', 'attn', 'mlp,attn' or projection names like 'gate_proj,up_proj'."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in MODULE_SETS:
            out.extend(MODULE_SETS[part])
            continue
        match = [p for p in PROJECTIONS if p.endswith("." + part) or p == part]
        if not match:
            raise FamilyError(f"unknown module {part!r} (mlp, attn, or one of {', '.join(p.split('.')[-1] for p in PROJECTIONS)})")
        out.extend(match)
    return tuple(dict.fromkeys(out))


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """'all', 'last:K', 'first:K', 'A-B' or '1,3,5'."""
    text = text.strip()
    try:
        if text == "all":
            layers = list(range(num_layers))
        elif text.startswith(("last:", "first:")):
            k = int(text.split(":")[1])
            layers = list(range(num_layers - k, num_layers)) if text.startswith("last") else list(range(k))
        elif "-" in text:
            a, b = (int(x) for x in text.split("-"))
            layers = list(range(a, b + 1))
        else:
            layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise FamilyError(f"--layers: cannot read {text!r} (all, last:K, first:K, A-B or a list)") from None
    if not layers or min(layers) < 0 or max(layers) >= num_layers:
        raise FamilyError(f"--layers {text!r} selects no valid layer (the model has {num_layers})")
    return tuple(layers)


def parse_rank(text: str) -> tuple[int, ...]:
    try:
        rank = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise FamilyError(f"--rank must be an integer or r0,r1,r2, got {text!r}") from None
    if len(rank) not in (1, 3) or min(rank) < 1:
        raise FamilyError(f"--rank must be one positive integer or three (r0,r1,r2), got {text!r}")
    return rank


def stack_groups(model: nn.Module, cfg: TrawlConfig) -> list[list[str]]:
    """Module paths grouped into stacks of equal shape, by the chosen strategy."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for layer in cfg.layers:
        for proj in cfg.modules:
            path = f"model.layers.{layer}.{proj}"
            module = model.get_submodule(path)
            if isinstance(module, LowRankLinear):
                raise FamilyError(f"{path} is already factored; TRAWL works on dense projections (run it on the parent)")
            key = (layer,) if cfg.strategy == "layer" else (proj,)
            groups[(*key, tuple(module.weight.shape))].append(path)
    return list(groups.values())


def decompose(stack: torch.Tensor, cfg: TrawlConfig) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Reconstructed slices and, per slice, a (B, A) pair that multiplies out to the same slice."""
    n, out_f, in_f = stack.shape
    tensor = tl.tensor(stack.double().numpy())
    if cfg.decomposition == "tucker":
        r0, r1, r2 = (n, cfg.rank[0], cfg.rank[0]) if len(cfg.rank) == 1 else cfg.rank
        r0, r1, r2 = min(r0, n), min(r1, out_f), min(r2, in_f)
        core, (U0, U1, U2) = tucker(tensor, rank=[r0, r1, r2], init="svd", random_state=cfg.seed)
        core, U0, U1, U2 = (torch.from_numpy(tl.to_numpy(x)) for x in (core, U0, U1, U2))
        pairs = []
        for i in range(n):
            C = torch.einsum("k,kab->ab", U0[i], core)  # r1 × r2
            pairs.append((U1, C @ U2.T) if r1 <= r2 else (U1 @ C, U2.T))
    elif cfg.decomposition == "cp":
        rank = min(cfg.rank[0], out_f, in_f)
        weights, (U0, U1, U2) = parafac(tensor, rank=rank, init="svd", random_state=cfg.seed, n_iter_max=200)
        weights, U0, U1, U2 = (torch.from_numpy(tl.to_numpy(x)) for x in (weights, U0, U1, U2))
        pairs = [(U1 * (weights * U0[i]), U2.T) for i in range(n)]
    else:
        raise FamilyError(f"unknown decomposition {cfg.decomposition!r} (cp or tucker)")
    return [B @ A for B, A in pairs], pairs


def trawl(model: nn.Module, cfg: TrawlConfig, progress: bool = True) -> tuple[nn.Module, dict]:
    """Apply TRAWL to `model`; return the new model and a report (relative error per stack)."""
    groups = stack_groups(model, cfg)
    factors, dense, report = {}, {}, {}
    for paths in tqdm(groups, desc=f"trawl {cfg.decomposition}", unit="stack", disable=not progress):
        stack = torch.stack([model.get_submodule(p).weight.detach() for p in paths])
        rebuilt, pairs = decompose(stack, cfg)
        err = torch.linalg.norm(torch.stack(rebuilt) - stack.double()) / torch.linalg.norm(stack.double())
        report[",".join(paths)] = round(float(err), 6)
        for path, W, pair in zip(paths, rebuilt, pairs):
            if cfg.mode == "compress":
                factors[path] = pair
            else:
                dense[path] = W
    if cfg.mode == "denoise":
        with torch.no_grad():
            for path, W in dense.items():
                model.get_submodule(path).weight.copy_(W.to(model.get_submodule(path).weight.dtype))
        return model, report
    return assemble(model, factors), report
