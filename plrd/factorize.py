"""Truncated SVD of every projection, plain or activation-aware (whitened), at ranks chosen to hit a
target share of the parent's parameters.

Whitened SVD (SVD-LLM): with S the Cholesky factor of the calibration Gram XᵀX, truncating W·S
minimizes the error ‖(W − W')X‖ on real activations rather than ‖W − W'‖. Factors:
    W·S = U Σ Vᵀ,   B = U_r Σ_r^½,   A = Σ_r^½ V_rᵀ S⁻¹,   so at full rank B·A = W exactly.
Rank allocation ("allocated") spends parameters where truncation costs most: every singular direction
k of matrix i is worth σ²_ik / Σ_k σ²_ik (its share of that matrix's output energy) per r-unit cost
(m_i + n_i); a threshold on that worth is bisected until the parameter target is met. A matrix whose
rank reaches the break-even point r·(m+n) ≥ m·n stays dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from family.errors import FamilyError
from family.lowrank import LowRankLinear, LowRankLlamaForCausalLM, lowrank_config_from, projection_paths

Allocation = Literal["sensitivity", "allocated", "uniform"]


@dataclass
class Spectrum:
    """The SVD of one (possibly whitened) projection, kept to cut factors at any rank."""

    path: str
    out_features: int
    in_features: int
    U: torch.Tensor  # out × k (float64)
    S: torch.Tensor  # k
    Vh: torch.Tensor  # k × in, already multiplied by S⁻¹ when whitened
    bias: torch.Tensor | None

    @property
    def full_rank(self) -> int:
        return len(self.S)

    @property
    def dense_cost(self) -> int:
        return self.out_features * self.in_features

    def cost(self, rank: int) -> int:
        """Parameters at `rank`, or dense when factoring would not save any."""
        return min(rank * (self.out_features + self.in_features), self.dense_cost)

    def is_dense_at(self, rank: int) -> bool:
        return rank * (self.out_features + self.in_features) >= self.dense_cost

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.S[:rank].sqrt()
        return balanced(self.U[:, :rank] * root, root[:, None] * self.Vh[:rank])


def balanced(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product B·A with each rank-one pair scaled so that ‖B[:, k]‖ = ‖A[k, :]‖.

    Whitening folds the calibration statistics into the split: with a Gram summed over N tokens, A
    comes out ~√N too small and B ~√N too large. Adam moves every element by about the learning rate
    whatever its scale, so an unbalanced pair makes healing diverge within a few steps (measured on
    SmolLM2-135M at lr 3e-4: the KL to the parent went 0.6 → 9.6 in three steps).
    """
    scale = (A.norm(dim=1) / B.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
    return B * scale, A / scale[:, None]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """W (out × in) of a dense nn.Linear or the product B·A of a LowRankLinear."""
    return module.weight.detach()


def whitening_factor(gram: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """Lower-triangular S with S·Sᵀ = XᵀX + δI; δ grows until the Cholesky succeeds."""
    gram = gram.to(torch.float64)
    scale = gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(gram), dtype=torch.float64)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(gram + damping * scale * eye)
        if info.item() == 0:
            return L
        damping *= 10
    raise FamilyError("calibration Gram matrix is not positive definite even with damping; use more calibration text")


def spectrum_of(path: str, module: nn.Module, gram: torch.Tensor | None) -> Spectrum:
    W = dense_weight(module).to(torch.float64)
    bias = module.B.bias if isinstance(module, LowRankLinear) else module.bias
    if gram is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        L = whitening_factor(gram)
        U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
        Vh = torch.linalg.solve_triangular(L, Vh, upper=False, left=False)  # Vh·L⁻¹ without the inverse
    out_f, in_f = W.shape
    return Spectrum(path, out_f, in_f, U, S, Vh, None if bias is None else bias.detach().clone())


def spectra(model: nn.Module, grams: dict[str, torch.Tensor] | None, progress: bool = True) -> list[Spectrum]:
    """SVD of every factorable projection of `model` (whitened when `grams` is given)."""
    paths = projection_paths(model.config.num_hidden_layers)
    out = []
    for path in tqdm(paths, desc="svd", unit="matrix", disable=not progress):
        out.append(spectrum_of(path, model.get_submodule(path), None if grams is None else grams[path]))
    return out


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def fixed_parameters(model: nn.Module) -> int:
    """Parameters outside the factorable projections (embeddings, norms): factorization leaves them be."""
    paths = set(projection_paths(model.config.num_hidden_layers))
    in_proj = {id(p) for path in paths for p in model.get_submodule(path).parameters()}
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_proj)


def _uniform_ranks(specs: list[Spectrum], budget: int) -> dict[str, int]:
    def ranks_at(phi: float) -> dict[str, int]:
        return {s.path: max(1, min(s.full_rank, round(phi * s.full_rank))) for s in specs}

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        cost = sum(s.cost(r) for s, r in zip(specs, ranks_at(mid).values()))
        lo, hi = (mid, hi) if cost <= budget else (lo, mid)
    ranks = ranks_at(lo)
    # Rounding leaves some budget unspent; top up one rank at a time, spread over the matrices.
    spent = sum(s.cost(ranks[s.path]) for s in specs)
    grew = True
    while grew:
        grew = False
        for s in specs:
            r = ranks[s.path]
            step = s.cost(r + 1) - s.cost(r)
            if r < s.full_rank and 0 < step <= budget - spent:
                ranks[s.path], spent, grew = r + 1, spent + step, True
    return ranks


def _allocated_ranks(specs: list[Spectrum], budget: int, sensitivity: dict[str, float] | None = None) -> dict[str, int]:
    """Greedy by worth per parameter. Without `sensitivity` a direction is worth its share of its
    matrix's output energy; with it (plrd.sensitivity), its output energy times how much that output
    matters to the loss, comparable across matrices."""
    worth = []
    for s in specs:
        energy = s.S.double() ** 2
        value = energy * sensitivity[s.path] if sensitivity is not None else energy / energy.sum().clamp_min(1e-300)
        worth.append(value / (s.out_features + s.in_features))

    def ranks_at(tau: float) -> dict[str, int]:
        # `worth` is non-increasing in k, so the directions above the threshold are a prefix.
        return {s.path: max(1, int((w >= tau).sum())) for s, w in zip(specs, worth)}

    lo, hi = 0.0, max(float(w.max()) for w in worth) * 2  # low threshold ⇒ more rank ⇒ more cost
    for _ in range(100):
        mid = (lo + hi) / 2
        cost = sum(s.cost(r) for s, r in zip(specs, ranks_at(mid).values()))
        lo, hi = (mid, hi) if cost > budget else (lo, mid)
    return ranks_at(hi)


def choose_ranks(specs: list[Spectrum], budget: int, allocation: Allocation, sensitivity: dict[str, float] | None = None) -> dict[str, int]:
    """Rank per projection so that projection parameters ≈ `budget` (never above it)."""
    if allocation == "uniform":
        return _uniform_ranks(specs, budget)
    if allocation == "allocated":
        return _allocated_ranks(specs, budget)
    if allocation == "sensitivity":
        if sensitivity is None:
            raise FamilyError("--allocation sensitivity needs output sensitivities (plrd.sensitivity)")
        return _allocated_ranks(specs, budget, sensitivity)
    raise FamilyError(f"unknown rank allocation {allocation!r} (sensitivity, allocated or uniform)")


def projection_budget(model: nn.Module, target_fraction: float, parent_parameters: int) -> int:
    """Parameters left for the projections when the whole member must hold `target_fraction` of the parent's."""
    try:
        target_fraction = float(target_fraction)
    except (TypeError, ValueError):
        raise FamilyError(f"target {target_fraction!r} is not a number: give a fraction of the parent's parameters, e.g. 0.8") from None
    if not 0.0 < target_fraction <= 1.0:  # also refuses NaN
        raise FamilyError(f"target {target_fraction} is out of range: give a fraction of the parent's parameters in (0, 1]")
    fixed = fixed_parameters(model)
    # The smallest member: every projection at rank 1.
    floor = sum(
        min(m.in_features + m.out_features, m.in_features * m.out_features)
        for m in (model.get_submodule(p) for p in projection_paths(model.config.num_hidden_layers))
    )
    budget = round(target_fraction * parent_parameters) - fixed
    if budget < floor:
        raise FamilyError(
            f"target {target_fraction} is impossible: embeddings and norms alone hold {fixed / parent_parameters:.3f} "
            f"of the parent's parameters; the smallest target is {(fixed + floor) / parent_parameters:.3f}"
        )
    return budget


def assemble(
    model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], dense: dict[str, torch.Tensor] | None = None
) -> LowRankLlamaForCausalLM:
    """A LowRankLlamaForCausalLM with `model`'s weights, except: each path in `factors` becomes the
    pair (B, A), and each path in `dense` gets that dense weight. Biases are kept."""
    dense = dense or {}
    config = lowrank_config_from(model.config, {p: B.shape[1] for p, (B, _) in factors.items()})
    dtype = next(model.parameters()).dtype
    member = LowRankLlamaForCausalLM(config).to(dtype)
    changed = tuple(p + "." for p in (*factors, *dense))
    state = {n: t for n, t in model.state_dict().items() if not n.startswith(changed)}
    for path in (*factors, *dense):
        old = model.get_submodule(path)
        bias = old.B.bias if isinstance(old, LowRankLinear) else old.bias
        if path in factors:
            B, A = factors[path]
            state[f"{path}.A.weight"], state[f"{path}.B.weight"] = A.to(dtype).contiguous(), B.to(dtype).contiguous()
            if bias is not None:
                state[f"{path}.B.bias"] = bias.detach()
        else:
            state[f"{path}.weight"] = dense[path].to(dtype).contiguous()
            if bias is not None:
                state[f"{path}.bias"] = bias.detach()
    result = member.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and member.config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise FamilyError(f"internal: member weights do not line up: {(missing + result.unexpected_keys)[:3]}")
    if member.config.tie_word_embeddings:
        member.tie_weights()
    member.generation_config = model.generation_config
    return member.eval()


def build_lowrank(
    model: nn.Module, specs: list[Spectrum], ranks: dict[str, int], factor_all: bool = False
) -> LowRankLlamaForCausalLM:
    """Each projection cut at its rank, or dense where that is cheaper (unless `factor_all`)."""
    factors, dense = {}, {}
    for spec in specs:
        rank = ranks[spec.path]
        if factor_all or not spec.is_dense_at(rank):
            factors[spec.path] = spec.factors(rank)
        else:
            B, A = spec.factors(spec.full_rank)
            dense[spec.path] = B @ A
    return assemble(model, factors, dense)


def factorize(
    model: nn.Module,
    target_fraction: float,
    parent_parameters: int,
    *,
    grams: dict[str, torch.Tensor] | None,
    allocation: Allocation = "allocated",
    progress: bool = True,
    specs: list[Spectrum] | None = None,
    sensitivity: dict[str, float] | None = None,
) -> LowRankLlamaForCausalLM:
    """`model` (dense or low-rank) cut down to `target_fraction` of `parent_parameters`.

    `grams` from `plrd.calibrate.collect_grams` selects whitened SVD; None selects plain SVD. The
    SVDs are the costly part: pass `specs` (from `spectra(model, grams)`) to cut several targets
    from one model without redoing them.
    """
    budget = projection_budget(model, target_fraction, parent_parameters)
    if specs is None:
        specs = spectra(model, grams, progress=progress)
    ranks = choose_ranks(specs, budget, allocation, sensitivity)
    return build_lowrank(model, specs, ranks)


def full_rank_member(model: nn.Module, grams: dict[str, torch.Tensor] | None) -> LowRankLlamaForCausalLM:
    """Every projection factored at full rank: the same function as `model` (a correctness check)."""
    specs = spectra(model, grams, progress=False)
    return build_lowrank(model, specs, {s.path: s.full_rank for s in specs}, factor_all=True)
