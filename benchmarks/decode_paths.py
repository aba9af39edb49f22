"""Decode speed of the torch engine's old path (transformers' forward with its DynamicCache, as the engine
ran before issue 11) against its new one (server.decoder: static cache, stacked projections, a layout
chosen by measurement), for the parent and members, side by side in one process and one run.

    python benchmarks/decode_paths.py --models runs/parent-smollm2-135m,runs/speed-family/<member> \
        --tokens 64 --repeats 5 [--concurrency 1,16] [--paths old,new,new-factored,new-dense,new-bf16,new-aten,new-onednn] [--compile]

Why in-process and interleaved: on a shared 2-core machine only ratios measured side by side mean
anything, so every (model, path) is timed once per round, round after round, and the table reports
medians and the ratios that matter: new/old per model, and member/parent per path next to the
parent/member weight-bytes ratio a memory-bound decoder should approach; also CPU time per step
(process time, all threads), which others' load on the cores disturbs less than wall time does. Greedy decoding of --tokens
tokens after a short prompt (no eos stop); c rows decode the same prompt together. `new` chooses
its matmul kernel by measurement at load, as the engine does; `new-aten` / `new-onednn` force one. The first path is
also checked token for token against the others at c=1 (a faster path that answers differently is
not a faster path). Through HTTP, `benchmarks/engine_speed.py --engines torch` serves the new path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import family  # noqa: E402,F401  (registers the low-rank architecture)
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from server.decoder import StaticDecoder  # noqa: E402
from server.layout import plan_layout  # noqa: E402

PROMPT = "The history of the city begins"


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


class OldPath:
    """transformers' forward, one step at a time over a DynamicCache (the engine's path before issue 11)."""

    def __init__(self, model_dir: Path):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(self, ids: list[int], n: int, c: int) -> list[int]:
        x = torch.tensor([ids] * c)
        out = self.model(input_ids=x, past_key_values=DynamicCache(), use_cache=True)
        cache, tok, got = out.past_key_values, out.logits[:, -1].argmax(-1), []
        for step in range(n - 1):
            got.append(int(tok[0]))
            pos = torch.full((c, 1), len(ids) + step)
            out = self.model(input_ids=tok[:, None], position_ids=pos, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1)
        return got + [int(tok[0])]


class NewPath:
    """server.decoder.StaticDecoder with a layout (measure, factored, dense) at a dtype, on a kernel."""

    def __init__(self, model_dir: Path, policy: str, dtype: str, max_len: int, compile_: bool, kernel: str = "measure"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        self.layout = plan_layout(model, dtype, policy, kernel)
        self.layout_s = time.perf_counter() - t0
        self.decoder = StaticDecoder(model, self.layout, max_slots=16, max_len=max_len)
        self.compile_s = 0.0
        if compile_:
            self.decoder._layers = torch.compile(self.decoder._layers, dynamic=True)

    def generate(self, ids: list[int], n: int, c: int) -> list[int]:
        tok = self.decoder.prefill(0, [ids] * c).argmax(-1)
        pos, got = torch.full((c,), len(ids)), []
        for _ in range(n - 1):
            got.append(int(tok[0]))
            tok = self.decoder.decode(tok, pos).argmax(-1)
            pos = pos + 1
        return got + [int(tok[0])]


def make(path: str, model_dir: Path, args) -> object:
    if path == "old":
        return OldPath(model_dir)
    policy = {"new-factored": "factored", "new-dense": "dense"}.get(path, "measure")
    if path not in ("new", "new-factored", "new-dense", "new-bf16", "new-auto", "new-aten", "new-onednn"):
        raise SystemExit(f"error: unknown path {path!r}")
    dtype = {"new-bf16": "bfloat16", "new-auto": "auto"}.get(path, "float32")
    kernel = {"new-aten": "aten", "new-onednn": "onednn"}.get(path, "measure")
    return NewPath(model_dir, policy, dtype, max_len=args.tokens + 64, compile_=args.compile and path.startswith("new"), kernel=kernel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="comma list of model folders; the first is the parent")
    ap.add_argument("--paths", default="old,new")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--concurrency", default="1")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default, one per core)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the new path's layers (inductor); reports compile time")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "decode_paths.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dirs = [Path(p) for p in args.models.split(",")]
    paths = args.paths.split(",")
    conc = [int(c) for c in args.concurrency.split(",")]
    names = [d.name for d in dirs]
    tok = AutoTokenizer.from_pretrained(dirs[0])
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]

    engines, setup = {}, {}
    for name, d in zip(names, dirs):
        for p in paths:
            t0 = time.perf_counter()
            e = make(p, d, args)
            first = e.generate(ids, 4, 1)  # warm-up (with --compile: the compile)
            setup[(name, p)] = {"load_s": round(time.perf_counter() - t0, 2), "layout": getattr(e, "layout", None) and e.layout.record()}
            engines[(name, p)] = e
            print(f"ready {name} {p} in {setup[(name, p)]['load_s']} s", flush=True)

    same = {}
    for name in names:  # token-for-token check at c=1 against the first path
        ref = engines[(name, paths[0])].generate(ids, args.tokens, 1)
        same[name] = {p: engines[(name, p)].generate(ids, args.tokens, 1) == ref for p in paths}

    rates: dict[tuple, list[float]] = {}
    cpu: dict[tuple, list[float]] = {}  # CPU ms per step (all threads): steadier than wall time when others share the cores
    for _ in range(args.repeats):  # interleaved rounds: every cell sees the same machine weather
        for c in conc:
            for name in names:
                for p in paths:
                    t0, cpu0 = time.perf_counter(), time.process_time()
                    engines[(name, p)].generate(ids, args.tokens, c)
                    rates.setdefault((name, p, c), []).append(c * args.tokens / (time.perf_counter() - t0))
                    cpu.setdefault((name, p, c), []).append(1e3 * (time.process_time() - cpu0) / args.tokens)
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    sizes = {n: weight_bytes(d) for n, d in zip(names, dirs)}
    parent = names[0]

    rows = ["| model | bytes ratio (parent/model) | c | " + " | ".join(f"{p} tok/s" for p in paths)
            + " | " + " | ".join(f"{p}/{paths[0]}" for p in paths[1:]) + " | " + " | ".join(f"speed-up {p}" for p in paths)
            + " | " + " | ".join(f"CPU ms/step {p}" for p in paths) + " | " + " | ".join(f"CPU speed-up {p}" for p in paths)
            + " | same tokens |",
            "|---|---|---|" + "---|" * (2 * len(paths) - 1 + len(paths) + 2 * len(paths)) + "---|"]
    for c in conc:
        for name in names:
            cells = [f"{med[(name, p, c)]:.1f}" for p in paths]
            cells += [f"{med[(name, p, c)] / med[(name, paths[0], c)]:.2f}" for p in paths[1:]]
            cells += [f"{med[(name, p, c)] / med[(parent, p, c)]:.2f}" for p in paths]
            cells += [f"{cpu_med[(name, p, c)]:.1f}" for p in paths]
            cells += [f"{cpu_med[(parent, p, c)] / cpu_med[(name, p, c)]:.2f}" for p in paths]
            rows.append(f"| {name} | {sizes[parent] / sizes[name]:.2f} | {c} | " + " | ".join(cells)
                        + f" | {'yes' if all(same[name].values()) else same[name]} |")
    table = "\n".join(rows)
    command = shlex.join(["python", *sys.argv])
    print(f"\nGreedy decode, {args.tokens} tokens, median of {args.repeats} interleaved rounds, {torch.get_num_threads()} torch threads, "
          f"{platform.machine()} CPU with {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}.\n`{command}`\n\n{table}\n", flush=True)
    for (name, p), s in setup.items():
        if s["layout"]:
            print(f"{name} {p}: load+layout {s['load_s']} s, {s['layout']['dtype']}, {s['layout']['projections']}, "
                  f"kernel {s['layout']['kernel']} {s['layout']['kernel_timings_us']}, head {s['layout']['head']} {s['layout']['head_timings_us']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, "table": table, "rates": {"|".join(map(str, k)): v for k, v in rates.items()},
                                     "cpu_ms_per_step": {"|".join(map(str, k)): v for k, v in cpu.items()},
                                     "setup": {f"{n}|{p}": s for (n, p), s in setup.items()}, "same_tokens": same, "bytes": sizes}, indent=2))


if __name__ == "__main__":
    main()
