"""Why the torch engine keeps its KV cache and attention in float32 when its weights are bf16: torch's
CPU attention (`F.scaled_dot_product_attention`) at the decode shapes of a SmolLM2 member, float32
against bf16, per layer, side by side in one process.

    python benchmarks/attention_dtype.py [--shapes 1x128,1x512,4x256,16x512] [--json runs/bench/attention_dtype.json]

A shape is rows x positions: `rows` sequences decode one token each against `positions` cached keys
(9 query heads, 3 KV heads of 64, as SmolLM2-135M; with the engine's mask when rows > 1). A decode
step runs this once per layer (30 layers), so 100 µs here is 3 ms a token. Each timing is the best of
--reps passes of --calls calls, the two dtypes alternating pass by pass.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402  (benchmarks/tables.py)

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def inputs(rows: int, positions: int, dtype: torch.dtype) -> tuple:
    q = torch.randn(rows, HEADS, 1, HEAD_DIM, dtype=dtype)
    k, v = (torch.randn(rows, KV_HEADS, positions, HEAD_DIM, dtype=dtype) for _ in range(2))
    mask = None if rows == 1 else torch.ones(rows, 1, 1, positions, dtype=torch.bool)
    return q, k, v, mask


def one_pass(args: tuple, calls: int) -> float:
    q, k, v, mask = args
    t0 = time.perf_counter()
    for _ in range(calls):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1x128,1x512,4x256,16x512", help="rows x positions, comma-separated")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            n, width = (int(x) for x in shape.split("x"))
            cases = {name: inputs(n, width, dt) for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
            best = {name: float("inf") for name in cases}
            for name, case in cases.items():
                one_pass(case, 5)  # warm-up
            for _ in range(args.reps):
                for name, case in cases.items():
                    best[name] = min(best[name], one_pass(case, args.calls))
            rows.append({"rows": n, "positions": width, "float32_us": round(best["float32"] * 1e6, 1),
                         "bfloat16_us": round(best["bfloat16"] * 1e6, 1), "bf16_over_fp32": round(best["bfloat16"] / best["float32"], 2)})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(tables.markdown(rows, [("rows", lambda r: r["rows"]), ("positions", lambda r: r["positions"]),
                          ("float32 µs/layer", lambda r: r["float32_us"]), ("bf16 µs/layer", lambda r: r["bfloat16_us"]),
                          ("bf16 / float32", lambda r: r["bf16_over_fp32"])]))
    print(f"\ncommand: {tables.command()}")
    tables.save_json(args.json, {"command": tables.command(), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
