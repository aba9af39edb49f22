"""Sequential refit: compress layer by layer, each projection refit in closed form to the parent.

Whitened SVD truncates each matrix on the parent's own inputs, so errors compound: layer 20 of a
member sees inputs that 19 compressed layers have already bent. Here (as in ROCKET and other
sequential compression methods) each projection is refit, in model order, to what the parent's
projection outputs, given the inputs that the *already compressed* layers produce:

    minimise ‖X_c Mᵀ − X_p Wᵀ‖  over M of rank r     (X_p: parent inputs, X_c: member inputs)

With G = X_cᵀX_c + δI = L·Lᵀ, the unconstrained solution is M* = W·X_pᵀX_c·G⁻¹, and the best rank-r M
is the truncated SVD of M*·L brought back by L⁻¹ (the whitened SVD of M*): B = U_r Σ_r^½,
A = Σ_r^½ V_rᵀ L⁻¹. Projections left dense get M* itself. Within a layer the four input points
(q/k/v, o, gate/up, down) are refit in order, so o_proj is fit on the outputs of the refit q/k/v.
It needs only Gram and cross-Gram matrices of calibration activations: no gradients, no training.

The damping δ (relative to the mean diagonal of G) pulls the fit towards the projection's current
weights M₀, not towards zero: minimise ‖X_c Mᵀ − X_p Wᵀ‖² + δ‖M − M₀‖², so M* = (W·X_pᵀX_c + δM₀)·G⁻¹
with G = X_cᵀX_c + δI. With 16k calibration tokens and inputs of up to 1536 features an undamped fit
follows noise. Damping towards zero (plain ridge, as this refit first did) shrinks every projection,
including the ones whose inputs the cut did not change. On SmolLM2-135M that
refit made a width-pruned member *further* from the parent than the pruned one (vocabulary 32,768,
MLP width 1458, held-out chat: agreement 0.808 pruned, 0.731 refit towards zero, 0.826 towards M₀).
Towards M₀ a projection whose inputs are the parent's is left exactly as it is, and a larger δ pays:
at width 1290, δ = 1e-3 / 1e-2 / 0.1 / 0.3 / 1 gave agreement 0.677 / 0.680 / 0.691 / 0.699 / 0.688,
at width 1031, 1e-2 / 0.1 / 0.3 gave 0.576 / 0.588 / 0.592 (KL 0.967 / 0.930 / 0.936): δ = 0.1.
Low-rank members were measured with the old damping only (docs/results/faithfulness.md, "PLRD recipes").
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm import tqdm
from transformers.masking_utils import create_causal_mask

from family.lowrank import LowRankLinear
from family.vocab_map import VocabMap
from plrd.factorize import balanced

# The four input points of a decoder layer, in the order the layer computes them.
STAGES = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class _Captured(Exception):
    """Raised by a pre-hook to stop a layer's forward once the wanted input is captured."""


def _layer_kwargs(model: nn.Module, h: torch.Tensor) -> dict:
    position_ids = torch.arange(h.shape[1], device=h.device)[None]
    mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=position_ids)
    return dict(attention_mask=mask, position_ids=position_ids, position_embeddings=model.model.rotary_emb(h, position_ids))


def _inputs_at(layer: nn.Module, path: str, chunks: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """The input of `layer.<path>` for each chunk of hidden states (tokens × features), running the
    layer only as far as that module."""
    got: list[torch.Tensor] = []

    def hook(_module, args):
        got.append(args[0].reshape(-1, args[0].shape[-1]).float())
        raise _Captured

    handle = layer.get_submodule(path).register_forward_pre_hook(hook)
    try:
        for h in chunks:
            try:
                layer(h, **kwargs)
            except _Captured:
                pass
    finally:
        handle.remove()
    return got


def _parent_pass(layer: nn.Module, chunks: list[torch.Tensor], kwargs: list[dict]) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """The inputs of each stage's first projection (per chunk) and the layer's outputs, in one pass."""
    got: dict[str, list[torch.Tensor]] = {stage[0]: [] for stage in STAGES}
    handles = [
        layer.get_submodule(path).register_forward_pre_hook(lambda _m, args, path=path: got[path].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for path in got
    ]
    try:
        out = [layer(h, **kw) for h, kw in zip(chunks, kwargs)]
    finally:
        for handle in handles:
            handle.remove()
    return got, out


def _grams(xc: list[torch.Tensor], xp: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_cᵀX_c, X_pᵀX_c) in float64, accumulated chunk by chunk. The member's input may be narrower
    than the parent's (a width-pruned MLP: down_proj reads fewer neurons)."""
    d = xc[0].shape[1]
    G = torch.zeros(d, d, dtype=torch.float64)
    C = torch.zeros(xp[0].shape[1], d, dtype=torch.float64)
    for c, p in zip(xc, xp):  # float32 products per chunk (10x faster than float64), float64 sums
        G += (c.T @ c).double()
        C += (p.T @ c).double()
    return G, C


def refit_projection(module: nn.Module, W: torch.Tensor, G: torch.Tensor, C: torch.Tensor, damping: float, dense: bool = True) -> float:
    """Set `module` (dense or LowRankLinear) to the best fit of the parent's W on these statistics;
    return the relative output error ‖(M − M*)L‖ / ‖M*·L‖ of the truncation (0 for dense)."""
    d = len(G)
    delta = damping * G.diagonal().mean().clamp_min(1e-12)
    L = torch.linalg.cholesky(G + delta * torch.eye(d, dtype=torch.float64))
    current = module.weight.detach().double()  # M₀ (a LowRankLinear's `weight` is its product B·A)
    M = torch.cholesky_solve((W.double() @ C + delta * current).T, L).T  # (W·C + δ·M₀)·(G + δI)⁻¹
    if not isinstance(module, LowRankLinear):
        if dense:
            module.weight.copy_(M.to(module.weight.dtype))
        return 0.0
    U, S, Vh = torch.linalg.svd(M @ L, full_matrices=False)
    r = module.rank
    Vh = torch.linalg.solve_triangular(L, Vh[:r], upper=False, left=False)  # V_rᵀ·L⁻¹
    root = S[:r].sqrt()
    B, A = balanced(U[:, :r] * root, root[:, None] * Vh)
    module.B.weight.copy_(B.to(module.B.weight.dtype))
    module.A.weight.copy_(A.to(module.A.weight.dtype))
    return float((S[r:] ** 2).sum().sqrt() / (S**2).sum().sqrt().clamp_min(1e-300))


def refine_block(layer: nn.Module, h_c: list[torch.Tensor], target: list[torch.Tensor], kwargs: list[dict], *, epochs: int, lr: float) -> None:
    """A few Adam epochs on one refit layer: its output, from the member's inputs, toward the parent's
    block output (so it also corrects what the layers before it got wrong). MSE scaled by the
    target's variance."""
    params = [p for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    var = torch.stack([t.float().var() for t in target]).mean().clamp_min(1e-12)
    with torch.enable_grad():
        for _ in range(epochs):
            for h, t, kw in zip(h_c, target, kwargs):
                loss = torch.nn.functional.mse_loss(layer(h, **kw), t) / var
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    for p in params:
        p.requires_grad_(False)
        p.grad = None


@torch.no_grad()
def sequential_refit(
    parent: nn.Module, member: nn.Module, rows: torch.Tensor, *, batch_size: int = 8, damping: float = 0.1, dense: bool = True,
    refine_epochs: int = 0, refine_lr: float = 1e-4, output_rows: dict[str, torch.Tensor] | None = None,
    vocab: VocabMap | None = None, progress: bool = True,
) -> dict[str, float]:
    """Refit every projection of `member` (in place; its ranks are kept) to `parent`, layer by layer,
    on calibration `rows` (N × L token ids). A projection with fewer outputs than the parent's (a
    width-pruned gate/up) reproduces the parent's rows `output_rows[path]`. With a trimmed vocabulary
    (`vocab`) `rows` are in the member's ids and the parent reads the same tokens in its own. Returns
    module path → relative truncation error."""
    output_rows = output_rows or {}
    parent.eval()
    member.eval()
    chunks = [rows[b : b + batch_size] for b in range(0, len(rows), batch_size)]
    h_p = [parent.model.embed_tokens(c if vocab is None else vocab.parent_ids(c)) for c in chunks]
    h_c = [member.model.embed_tokens(c) for c in chunks]
    kwargs = [_layer_kwargs(parent, h) for h in h_p]
    errors: dict[str, float] = {}
    layers = parent.config.num_hidden_layers
    bar = tqdm(total=layers * rows.numel(), unit="tok", unit_scale=True, desc="refit", disable=not progress)
    start = time.perf_counter()
    for i in range(layers):
        lp, lc = parent.model.layers[i], member.model.layers[i]
        # The parent's layer is fixed: one pass gives its inputs at all four points and its output.
        xp_all, h_p = _parent_pass(lp, h_p, kwargs)
        for stage in STAGES:
            xc = [x for h, kw in zip(h_c, kwargs) for x in _inputs_at(lc, stage[0], [h], kw)]
            G, C = _grams(xc, xp_all[stage[0]])
            del xc
            for path in stage:
                name = f"model.layers.{i}.{path}"
                W = lp.get_submodule(path).weight.detach()
                W = W[output_rows[name]] if name in output_rows else W
                errors[name] = refit_projection(lc.get_submodule(path), W, G, C, damping, dense)
        del xp_all
        if refine_epochs > 0:
            refine_block(lc, h_c, h_p, kwargs, epochs=refine_epochs, lr=refine_lr)
        h_c = [lc(h, **kw) for h, kw in zip(h_c, kwargs)]
        bar.update(rows.numel())
        bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start):.0f}")
    bar.close()
    return errors
