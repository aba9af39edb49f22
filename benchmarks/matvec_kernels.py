"""How fast each CPU kernel reads a weight matrix at batch 1 (a decode step's matrix-vector products),
in GB/s, for the shapes a SmolLM2-135M member multiplies: stacked q/k/v, o, stacked gate/up, down, and
the tied LM head.

    python benchmarks/matvec_kernels.py [--shapes 960x576,576x576,3072x576,576x1536,49152x576] [--dtype float32]

Why: a decode step at batch 1 reads every weight once, so a kernel that reads slower than memory
allows is time the roofline does not explain. Each timing cycles through copies of the matrix larger
than the last-level cache (as a decode step reads it: from memory), best of --reps passes. Kernels:
aten's `F.linear`, `torch.mv`, the transposed head form (`(W @ xᵀ)ᵀ`), oneDNN's linear on weights
reordered once (server.kernels), and inductor's compiled row sums (server.layout.streamed_matvec,
the torch engine's one-row head where it wins).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.kernels import Linear, onednn_available  # noqa: E402
from server.layout import DTYPES, streamed_matvec  # noqa: E402

COLD_BYTES = 600 << 20


def best_pass(call, mats, x, reps: int) -> float:
    """Seconds per matrix, the best pass over all copies."""
    with torch.inference_mode():
        for m in mats[:2]:
            call(x, m)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for m in mats:
                call(x, m)
            best = min(best, (time.perf_counter() - t0) / len(mats))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="960x576,576x576,3072x576,576x1536,49152x576", help="out x in, comma-separated")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    kernels = {"F.linear": lambda x, w: F.linear(x, w), "torch.mv": lambda x, w: torch.mv(w, x[0]),
               "transposed": lambda x, w: (w @ x.T).T}
    streamed = streamed_matvec()
    if streamed is not None:
        kernels["streamed (inductor)"] = streamed
    with_onednn = onednn_available(dtype)
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        size = out_f * in_f * torch.tensor([], dtype=dtype).element_size()
        copies = [torch.randn(out_f, in_f).to(dtype) for _ in range(max(2, COLD_BYTES // size))]
        x = torch.randn(1, in_f).to(dtype)
        cells = {name: best_pass(k, copies, x, args.reps) for name, k in kernels.items()}
        if with_onednn:
            packed = [Linear(w, None, "onednn") for w in copies]
            cells["oneDNN (reordered)"] = best_pass(lambda x, lin: lin(x), packed, x, args.reps)
        rows.append((shape, size, cells))
        print(f"{shape}: " + ", ".join(f"{k} {size / t / 1e9:.1f} GB/s" for k, t in cells.items()), flush=True)
    names = list(rows[0][2])
    print(f"\nBatch-1 matrix-vector read speed, GB/s (µs per product), {args.dtype}, {platform.machine()} CPU, "
          f"{torch.get_num_threads()} torch threads, {time.strftime('%Y-%m-%d %H:%M')}.")
    print(f"`{shlex.join(['python', *sys.argv])}`\n")
    print("| out × in | MB | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for shape, size, cells in rows:
        print(f"| {shape} | {size / 1e6:.1f} | " + " | ".join(f"{size / cells[n] / 1e9:.1f} ({cells[n] * 1e6:.0f})" for n in names) + " |")


if __name__ == "__main__":
    main()
