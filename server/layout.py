"""How each projection of a member is served on this machine, chosen by measurement at load time.

A factored projection W ≈ B·A reads r·(in + out) weights instead of in·out, but costs two matmuls:
on a CPU at batch 1 the second call can cost more than the bytes it saves when r is near break-even
or the matrix is small. Kernels may also prefer ranks that are a multiple of some block size. And
bf16 halves the bytes, yet small bf16 matmuls were measured *slower* than fp32 through torch's
default CPU path on this project's machine. None of this is predictable from the shapes alone, so
`plan_layout` times each distinct (in, out, rank) at batch 1 on this machine, in each candidate form
(dense, factor pair, factor pair at a rank padded up to PAD_MULTIPLE with zeros: exact), keeps the
fastest, and picks the dtype by timing one decoder layer's projections in each. The choice is
recorded (`Layout.record()`), served by the worker at /v1/models and /health, and logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from family.lowrank import PROJECTIONS, LowRankLinear

PAD_MULTIPLE = 16  # candidate rank rounding (zero rows in A, zero columns in B: the same function)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Projection:
    """One projection's weights as stored: dense `weight`, or factors `A` (r × in) and `B` (out × r)."""

    in_features: int
    out_features: int
    weight: torch.Tensor | None = None
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        return None if self.A is None else self.A.shape[0]

    @classmethod
    def of(cls, model: nn.Module, path: str) -> "Projection":
        m = model.get_submodule(path)
        if isinstance(m, LowRankLinear):
            return cls(m.in_features, m.out_features, A=m.A.weight.detach(), B=m.B.weight.detach(),
                       bias=None if m.B.bias is None else m.B.bias.detach())
        return cls(m.in_features, m.out_features, weight=m.weight.detach(), bias=None if m.bias is None else m.bias.detach())


@dataclass(frozen=True)
class Form:
    """How one projection is served: `dense` (merged back if factored) or `factored` at `rank` (≥ its own)."""

    kind: str  # "dense" | "factored"
    rank: int | None = None

    def matrices(self, p: Projection) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(first matrix, second matrix or None, bias) for this form of `p`."""
        if self.kind == "dense":
            w = p.weight if p.weight is not None else (p.B.float() @ p.A.float()).to(p.A.dtype)
            return w, None, p.bias
        pad = self.rank - p.rank
        A = F.pad(p.A, (0, 0, 0, pad)) if pad else p.A  # zero rows: their outputs are 0 ...
        B = F.pad(p.B, (0, pad)) if pad else p.B  # ... and meet zero columns
        return A, B, p.bias

    def label(self) -> str:
        return "dense" if self.kind == "dense" else f"factored@{self.rank}"


@dataclass
class Layout:
    dtype: torch.dtype
    forms: dict[str, Form]  # module path → form
    timings_us: dict[str, dict[str, float]] = field(default_factory=dict)  # shape key → form label → µs
    how: str = "measured"

    def record(self) -> dict:
        """What was chosen and why (JSON): dtype, counts per form, the per-shape timings."""
        counts: dict[str, int] = {}
        for f in self.forms.values():
            key = "dense" if f.kind == "dense" else "factored"
            counts[key] = counts.get(key, 0) + 1
        padded = sum(1 for f in self.forms.values() if f.kind == "factored" and f.rank % PAD_MULTIPLE == 0)
        return {"dtype": str(self.dtype).removeprefix("torch."), "how": self.how, "projections": counts,
                "factored_at_padded_rank": padded, "timings_us": self.timings_us}


def _time_us(fn, reps: int = 7, inner: int = 5) -> float:
    """Fastest of `reps` runs of `inner` calls (the minimum is what a busy shared machine leaves alone)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e6


def _candidates(p: Projection) -> list[Form]:
    if p.rank is None:
        return [Form("dense")]
    forms = [Form("dense"), Form("factored", p.rank)]
    padded = -(-p.rank // PAD_MULTIPLE) * PAD_MULTIPLE
    if padded != p.rank and padded * (p.in_features + p.out_features) < p.in_features * p.out_features:
        forms.append(Form("factored", padded))
    return forms


def _time_form(p: Projection, form: Form, dtype: torch.dtype, batch: int = 1) -> float:
    x = torch.randn(batch, p.in_features, dtype=dtype)
    if form.kind == "dense":
        w = torch.randn(p.out_features, p.in_features, dtype=dtype)
        return _time_us(lambda: F.linear(x, w))
    a, b = torch.randn(form.rank, p.in_features, dtype=dtype), torch.randn(p.out_features, form.rank, dtype=dtype)
    return _time_us(lambda: F.linear(F.linear(x, a), b))


def plan_layout(model: nn.Module, dtype: str = "float32", policy: str = "measure") -> Layout:
    """Choose each projection's form (and with dtype="auto" the dtype) for `model` on this machine.

    policy "measure": time the candidates per distinct shape; "factored": every factored projection
    stays a pair at its own rank (what was built); "dense": every one merged back (tests and baselines).
    """
    paths = [f"model.layers.{i}.{p}" for i in range(model.config.num_hidden_layers) for p in PROJECTIONS]
    projections = {path: Projection.of(model, path) for path in paths}
    if dtype == "auto":
        chosen, timings = choose_dtype([projections[f"model.layers.0.{p}"] for p in PROJECTIONS])
    else:
        chosen, timings = DTYPES[dtype], {}
    if policy in ("factored", "dense"):
        forms = {path: Form("dense") if p.rank is None or policy == "dense" else Form("factored", p.rank)
                 for path, p in projections.items()}
        return Layout(chosen, forms, timings, how=policy)
    if policy != "measure":
        raise ValueError(f"layout policy must be measure, factored or dense, got {policy!r}")
    best: dict[tuple, Form] = {}
    forms = {}
    for path, p in projections.items():
        key = (p.in_features, p.out_features, p.rank)
        if key not in best:
            options = _candidates(p)
            if len(options) == 1:
                best[key] = options[0]
            else:
                times = {f.label(): _time_form(p, f, chosen) for f in options}
                best[key] = min(options, key=lambda f: times[f.label()])
                timings[f"{p.in_features}x{p.out_features}@{p.rank}"] = {k: round(v, 1) for k, v in times.items()}
        forms[path] = best[key]
    return Layout(chosen, forms, timings)


def choose_dtype(layer: list[Projection]) -> tuple[torch.dtype, dict]:
    """fp32 or bf16 for serving, whichever runs one decoder layer's projections (as stored) faster here."""
    totals = {}
    for name in ("float32", "bfloat16"):
        dt = DTYPES[name]
        totals[name] = sum(_time_form(p, Form("dense") if p.rank is None else Form("factored", p.rank), dt) for p in layer)
    pick = min(totals, key=totals.get)
    return DTYPES[pick], {"dtype (one layer, µs)": {k: round(v, 1) for k, v in totals.items()}}
