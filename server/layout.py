"""How each projection of a member is served on this machine, chosen by measurement at load time.

A factored projection W ≈ B·A reads r·(in + out) weights instead of in·out, but costs two matmuls:
on a CPU at batch 1 the second call can cost more than the bytes it saves when r is near break-even
or the matrix is small. Kernels may also prefer ranks that are a multiple of some block size. And
bf16 halves the bytes, yet small bf16 matmuls were measured *slower* than fp32 through torch's
default CPU path on this project's machine. None of this is predictable from the shapes alone, so
`plan_layout` times each distinct (in, out, rank) at batch 1 on this machine, in each candidate form
(dense, factor pair, factor pair at a rank padded up to PAD_MULTIPLE with zeros: exact) with its
weights read from memory as a decode step reads them (cycling over copies larger than the cache: a
cache-hot timing favoured whatever computes fastest, not what reads least), keeps the fastest, and
picks the dtype by timing one decoder layer's projections in each, then the matmul kernel
(server.kernels: aten or oneDNN on prepacked weights) by timing that layer's matmuls as served, at
batch 1 and 16, and how the tied LM head multiplies (`choose_head`). The choice is
recorded (`Layout.record()`), served by the worker at /v1/models and /health, and logged.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from family.lowrank import PROJECTIONS, LowRankLinear
from server.kernels import KERNELS, PACK_BATCH, Linear, runnable_kernels

log = logging.getLogger("server.layout")

PAD_MULTIPLE = 16  # candidate rank rounding (zero rows in A, zero columns in B: the same function)
MARGIN = 0.1  # another form, kernel or head product replaces the default only when at least this much faster (timings are noisy)
# Six load-time timings in a row of one layer's matmuls at batch 1, same kernel, on the 2-core AVX2
# machine: 1585-2413 µs. A batch-1 difference inside this is not evidence against a kernel.
BATCH1_NOISE = 0.25
COLD_BYTES = 64 << 20  # weights cycled per timing: past the last-level cache, as a decode step reads them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Projections that read one input, served as one stacked matmul (then a B matmul per factored one).
STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


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
    kernel: str = "aten"  # server.kernels: how every projection's matmuls run
    kernel_timings_us: dict[str, dict[int, float]] = field(default_factory=dict)  # kernel → batch → µs per layer
    head: str = "linear"  # HEADS: how the LM head's matmul is called
    head_timings_us: dict[str, dict[int, float]] = field(default_factory=dict)  # head form → batch → µs
    head_batch1: str = "linear"  # HEADS_BATCH1: the head's product when one row decodes (c=1)
    head_batch1_timings_us: dict[str, float] = field(default_factory=dict)  # form → µs at batch 1

    def record(self) -> dict:
        """What was chosen and why (JSON): dtype, counts per form, the per-shape timings."""
        counts: dict[str, int] = {}
        for f in self.forms.values():
            key = "dense" if f.kind == "dense" else "factored"
            counts[key] = counts.get(key, 0) + 1
        padded = sum(1 for f in self.forms.values() if f.kind == "factored" and f.rank % PAD_MULTIPLE == 0)
        return {"dtype": str(self.dtype).removeprefix("torch."), "how": self.how, "projections": counts,
                "factored_at_padded_rank": padded, "timings_us": self.timings_us,
                "kernel": self.kernel, "kernel_timings_us": self.kernel_timings_us,
                "head": self.head, "head_timings_us": self.head_timings_us,
                "head_batch1": self.head_batch1, "head_batch1_timings_us": self.head_batch1_timings_us}


def _copies(numel: int, dtype: torch.dtype) -> int:
    """How many copies of a weight set to cycle through so that each call reads it from memory, as a
    decode step does (one pass over every weight per token), not from a cache that holds it."""
    size = numel * torch.tensor([], dtype=dtype).element_size()
    return max(2, min(64, -(-COLD_BYTES // max(1, size))))


def _candidates(p: Projection) -> list[Form]:
    if p.rank is None:
        return [Form("dense")]
    forms = [Form("dense"), Form("factored", p.rank)]
    padded = -(-p.rank // PAD_MULTIPLE) * PAD_MULTIPLE
    if padded != p.rank and padded * (p.in_features + p.out_features) < p.in_features * p.out_features:
        forms.append(Form("factored", padded))
    return forms


def _runner(p: Projection, form: Form, dtype: torch.dtype, batch: int = 1):
    """A call of `form` at this shape over enough weight copies to read them from memory; and their count."""
    x = torch.randn(batch, p.in_features, dtype=dtype)
    shapes = [(p.out_features, p.in_features)] if form.kind == "dense" else [(form.rank, p.in_features), (p.out_features, form.rank)]
    per_copy = sum(o * i for o, i in shapes)
    n = _copies(per_copy, dtype)
    buffer = torch.full((n * per_copy,), 0.01, dtype=dtype)  # values do not matter to the kernels; memset is fast
    copies = []
    for c in range(n):
        start, mats = c * per_copy, []
        for o, i in shapes:
            mats.append(buffer[start:start + o * i].view(o, i))
            start += o * i
        copies.append(mats)

    def run() -> None:
        for mats in copies:
            h = x
            for w in mats:
                h = F.linear(h, w)
    return run, n


def time_forms(p: Projection, forms: list[Form], dtype: torch.dtype, reps: int = 5) -> dict[str, float]:
    """µs per call of each form, timed in turns (each sees the same machine weather), fastest of `reps`."""
    runners = [(f.label(), *_runner(p, f, dtype)) for f in forms]
    best = {label: float("inf") for label, _, _ in runners}
    for run, _ in [(r, n) for _, r, n in runners]:
        run()  # warm-up
    for _ in range(reps):
        for label, run, n in runners:
            t0 = time.perf_counter()
            run()
            best[label] = min(best[label], (time.perf_counter() - t0) / n * 1e6)
    return best


def plan_layout(model: nn.Module, dtype: str = "float32", policy: str = "measure", kernel: str = "measure") -> Layout:
    """Choose each projection's form (and with dtype="auto" the dtype), then the matmul kernel, for
    `model` on this machine.

    policy "measure": time the candidates per distinct shape; "factored": every factored projection
    stays a pair at its own rank (what was built); "dense": every one merged back (tests and baselines).
    kernel "measure": time aten against oneDNN on layer 0's matmuls as served, and the LM head's two
    call forms; or "aten" / "onednn" (the head then as F.linear, as before either was measured).
    """
    if kernel != "measure" and kernel not in KERNELS:
        raise ValueError(f"kernel must be measure, {' or '.join(KERNELS)}, got {kernel!r}")
    layout = _plan_forms(model, dtype, policy)
    if kernel == "measure":
        layout.kernel, layout.kernel_timings_us = choose_kernel(_layer_shapes(model, layout.forms, 0), layout.dtype)
        head = model.lm_head.weight.detach().to(layout.dtype)
        layout.head, layout.head_timings_us = choose_head(head)
        layout.head_batch1, layout.head_batch1_timings_us = choose_head_batch1(head, layout.head)
    elif kernel not in runnable_kernels(layout.dtype):
        raise ValueError(f"the {kernel} kernel does not run {layout.dtype} on this machine (torch {torch.__version__})")
    else:
        layout.kernel = kernel
    return layout


def _layer_shapes(model: nn.Module, forms: dict[str, Form], layer: int) -> list[tuple[int, int]]:
    """[out, in] of every matmul one decoder layer runs as served: a stacked first matmul per stage,
    then a B per factored projection."""
    shapes = []
    for names in STAGES:
        parts = [(Projection.of(model, f"model.layers.{layer}.{n}"), forms[f"model.layers.{layer}.{n}"]) for n in names]
        firsts = [form.matrices(p) for p, form in parts]
        shapes.append((sum(first.shape[0] for first, _, _ in firsts), parts[0][0].in_features))
        shapes += [tuple(second.shape) for _, second, _ in firsts if second is not None]
    return shapes


def choose_kernel(shapes: list[tuple[int, int]], dtype: torch.dtype) -> tuple[str, dict[str, dict[int, float]]]:
    """oneDNN where it runs here and `wins` over aten on one layer's matmuls; else aten. Returns the
    choice and µs per kernel and batch."""
    times = time_kernels(shapes, dtype)
    return ("onednn" if "onednn" in times and wins(times["onednn"], times["aten"]) else "aten"), times


def wins(new: dict[int, float], old: dict[int, float]) -> bool:
    """The rule of every load-time choice between two ways of computing one product (times in µs by
    batch): `new` must be faster by MARGIN at batch PACK_BATCH, where a loaded worker spends its time,
    and at most BATCH1_NOISE slower at batch 1."""
    return new[PACK_BATCH] < (1 - MARGIN) * old[PACK_BATCH] and new[1] <= (1 + BATCH1_NOISE) * old[1]


HEADS = ("linear", "transposed")
# Why two forms of one product: the tied head is [vocab, hidden] (49152 × 576 for SmolLM2). F.linear(x, W)
# asks BLAS for x·Wᵀ; (W·xᵀ)ᵀ asks for the same numbers as a product with W untransposed, which the
# project's AVX2 machine ran 1.4-2.2× faster at batch 4-16 and as fast at batch 1. No copy of W either way.


HEADS_BATCH1 = HEADS + ("streamed",)
# Why a third form for one row: at batch 1 the head is a matrix-vector product over the largest matrix
# (a fifth of SmolLM2's bytes), and torch's CPU kernels for it (F.linear, mv, the transposed form) read
# it at about 17 GB/s on the project's AVX-512 machine, where a plain sum reads 46-49. The same product
# written as a broadcast multiply and a row sum, compiled by inductor into one vectorised loop, streamed
# it at 49-51 GB/s (2.2-2.3 ms against 6.7-6.8 for 49152 × 576). It reads the tied weight as it is (no
# second copy, unlike oneDNN's reordered weights), but needs a C++ compiler at load: where there is
# none, `streamed_matvec` is None and the head keeps its batch form.


def _row_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w * x).sum(-1)


@functools.cache
def streamed_matvec() -> Callable | None:
    """inductor's compiled `(w * x).sum(-1)` (x: [1, in], w: [out, in] → [out]), or None where it cannot
    compile here (no C++ compiler, or a torch without inductor). Compiled once per process."""
    fn = torch.compile(_row_sums, dynamic=False)
    try:
        with torch.inference_mode():  # as the decoder calls it (a different mode would recompile)
            fn(torch.ones(1, 8), torch.ones(4, 8))
    except Exception as exc:  # noqa: BLE001  (inductor raises many kinds; any of them means "not here")
        log.warning("the streamed batch-1 head is not available here (%s: %s)", type(exc).__name__, str(exc)[:200])
        return None
    return fn


def head_logits(h: torch.Tensor, weight: torch.Tensor, form: str) -> torch.Tensor:
    """The LM head's product in one of HEADS_BATCH1 (h: [..., hidden] → [..., vocab]; "streamed": one row)."""
    if form == "streamed":
        rows = h.reshape(-1, h.shape[-1])
        if rows.shape[0] != 1:
            raise ValueError(f"the streamed head takes one row, got {rows.shape[0]}")
        return streamed_matvec()(rows, weight).reshape(*h.shape[:-1], weight.shape[0])
    if form == "transposed":
        return (weight @ h.reshape(-1, h.shape[-1]).T).T.reshape(*h.shape[:-1], weight.shape[0])
    return F.linear(h, weight)


def choose_head(weight: torch.Tensor, reps: int = 3) -> tuple[str, dict[str, dict[int, float]]]:
    """"transposed" where it `wins` over "linear" (the head is larger than a cache, so each call reads
    it from memory); else "linear"."""
    inputs = {b: torch.randn(b, weight.shape[1], dtype=weight.dtype) for b in (1, PACK_BATCH)}
    times = _time_in_turns({f: lambda b, f=f: head_logits(inputs[b], weight, f) for f in HEADS}, reps)
    return ("transposed" if wins(times["transposed"], times["linear"]) else "linear"), times


def choose_head_batch1(weight: torch.Tensor, batch_form: str, reps: int = 5) -> tuple[str, dict[str, float]]:
    """"streamed" for one row where it compiles here and runs MARGIN faster than `batch_form` at batch 1;
    else `batch_form`. Returns the choice and µs per form (the head is read from memory either way)."""
    if streamed_matvec() is None:
        return batch_form, {}
    h = torch.randn(1, weight.shape[1], dtype=weight.dtype)
    times = _time_in_turns({f: lambda b, f=f: head_logits(h, weight, f) for f in (batch_form, "streamed")}, reps, batches=(1,))
    best = {f: t[1] for f, t in times.items()}  # the warm-up round also compiles this shape
    return ("streamed" if best["streamed"] < (1 - MARGIN) * best[batch_form] else batch_form), best


def time_kernels(shapes: list[tuple[int, int]], dtype: torch.dtype, reps: int = 5) -> dict[str, dict[int, float]]:
    """µs for one pass over weights of `shapes` per kernel, at batch 1 and PACK_BATCH, each weight read
    from memory (copies cycled past the cache)."""
    n = _copies(sum(o * i for o, i in shapes), dtype)
    base = [torch.randn(o, i).to(dtype) * 0.05 for o, i in shapes]
    kernels = runnable_kernels(dtype)
    copies = {k: [[Linear(w.clone(), None, k) for w in base] for _ in range(n)] for k in kernels}
    inputs = {b: {i: torch.randn(b, i).to(dtype) for _, i in shapes} for b in (1, PACK_BATCH)}

    def one_pass(kernel: str, b: int) -> None:
        for layer in copies[kernel]:
            for lin in layer:
                lin(inputs[b][lin.in_features])
    return _time_in_turns({k: lambda b, k=k: one_pass(k, b) for k in kernels}, reps, per=n)


def _time_in_turns(variants: dict[str, Callable[[int], object]], reps: int, per: int = 1,
                   batches: tuple[int, ...] = (1, PACK_BATCH)) -> dict[str, dict[int, float]]:
    """µs per call (divided by `per`) of each variant at each of `batches`: one warm-up round,
    then `reps` rounds in turns, so every variant sees the same machine weather; the fastest of each."""
    best = {name: {b: float("inf") for b in batches} for name in variants}
    with torch.inference_mode():
        for round_ in range(reps + 1):
            for b in batches:
                for name, call in variants.items():
                    t0 = time.perf_counter()
                    call(b)
                    if round_:
                        best[name][b] = min(best[name][b], (time.perf_counter() - t0) / per * 1e6)
    return {name: {b: round(t, 1) for b, t in v.items()} for name, v in best.items()}


def _plan_forms(model: nn.Module, dtype: str, policy: str) -> Layout:
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
    best: dict[tuple, str] = {}  # (in, out, rank rounded up to PAD_MULTIPLE) → "dense" | "own" | "padded"
    forms = {}
    for path, p in projections.items():
        options = _candidates(p)
        if len(options) == 1:
            forms[path] = options[0]
            continue
        key = (p.in_features, p.out_features, -(-p.rank // PAD_MULTIPLE))
        if key not in best:
            times = time_forms(p, options, chosen)
            timings[f"{p.in_features}x{p.out_features}@{p.rank}"] = {k: round(v, 1) for k, v in times.items()}
            built = times[Form("factored", p.rank).label()]  # what was built wins unless another form is clearly faster
            fastest = min(options, key=lambda f: times[f.label()])
            pick = fastest if times[fastest.label()] < (1 - MARGIN) * built else Form("factored", p.rank)
            best[key] = "dense" if pick.kind == "dense" else "own" if pick.rank == p.rank else "padded"
        forms[path] = {"dense": options[0], "own": options[1]}.get(best[key], options[-1])
    return Layout(chosen, forms, timings)


def choose_dtype(layer: list[Projection]) -> tuple[torch.dtype, dict]:
    """fp32 or bf16 for serving, whichever runs one decoder layer's projections (as stored) faster here."""
    totals = {}
    for name in ("float32", "bfloat16"):
        dt = DTYPES[name]
        totals[name] = sum(min(time_forms(p, [Form("dense") if p.rank is None else Form("factored", p.rank)], dt).values()) for p in layer)
    pick = min(totals, key=totals.get)
    return DTYPES[pick], {"dtype (one layer, µs)": {k: round(v, 1) for k, v in totals.items()}}
