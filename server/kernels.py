"""The matmul kernel that serves a member's projections: aten's `F.linear`, or oneDNN's linear on
weights reordered once at load into its own blocked layout (`torch.ops.mkldnn`, the kernel that
inductor's CPU backend uses for frozen linear layers).

Why: a decode step is a handful of small matmuls per layer, and at batch 16 (a loaded worker) torch's
default path for them is compute-bound on kernels that are not this CPU's best. A weight reordered once
for oneDNN is read in the order its kernel wants. On the project's 2-core AVX2 machine, over one
SmolLM2-135M decode step's projections (weights read from memory, not cache), oneDNN took 95 ms
against 178 at batch 16 and 57 against 81 at batch 1 in one run, but as often within 10% at batch 1.
It is an internal torch op, and how much it helps depends on the CPU's ISA and on oneDNN's build, so
the engine times both kernels on the member's own shapes at load and serves with the one that wins
(`server.layout.choose_kernel`); the choice and its timings are recorded with the layout. The tied
embedding / LM head stays on aten: reordering it would keep a second copy of a fifth of the model's
weights (its product is chosen apart: `server.layout.choose_head`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNELS = ("aten", "onednn")
PACK_BATCH = 16  # the batch oneDNN's reorder is tuned for; measured as fast at batch 1 as a batch-1 reorder


def onednn_available(dtype: torch.dtype) -> bool:
    """Whether this torch build runs oneDNN's prepacked linear at `dtype`, with aten's answer."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        w, x = torch.randn(24, 40).to(dtype), torch.randn(3, 40).to(dtype)
        got = Linear(w, None, "onednn")(x)
    except (RuntimeError, NotImplementedError):
        return False
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    return torch.allclose(got.float(), F.linear(x, w).float(), atol=tol, rtol=tol)


def runnable_kernels(dtype: torch.dtype) -> list[str]:
    """The KERNELS that run `dtype` here: aten always, oneDNN where `onednn_available`."""
    return [k for k in KERNELS if k == "aten" or onednn_available(dtype)]


class Linear:
    """x @ Wᵀ + b with W held the way `kernel` reads it. Inference only (no autograd through oneDNN)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.kernel, self.bias = kernel, bias
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().contiguous()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH) if kernel == "onednn" else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
