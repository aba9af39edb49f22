"""The torch engine's decoder (server/decoder.py) at a git commit against the working tree's, side by side.

A change to the decode path is worth keeping only if it is faster on the same machine at the same
moment, and these machines are shared and noisy: so both decoders are built from the same loaded
model and layout (the layout's kernel and head timings are measured once, at load) in one process,
and their rounds alternate. Each round prefills a short prompt and decodes `--tokens` greedy tokens
at batch 1 (the step every chat request pays); the table gives the median ms per token, wall and CPU
(process time over all threads, which others' load disturbs less), the speed-up, and whether both
decoders chose the same tokens (a faster path that answers differently is not a faster path).

    python benchmarks/decoder_ab.py --base HEAD --models runs/family-smollm2-135m/smollm2-135m-p100,runs/family-smollm2-135m/smollm2-135m-p70
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import family  # noqa: E402,F401  (registers the low-rank architecture)
from transformers import AutoModelForCausalLM  # noqa: E402

import server.decoder as current  # noqa: E402
import tables  # noqa: E402  (benchmarks/tables.py)
from server.layout import plan_layout  # noqa: E402

PROMPT = list(range(100, 140))


def decoder_at(ref: str):
    """server/decoder.py as it was at git `ref`, imported under another name (its imports are today's)."""
    try:
        source = subprocess.run(["git", "show", f"{ref}:server/decoder.py"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: no server/decoder.py at {ref!r}: {e.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "decoder_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("decoder_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_round(decoder, tokens: int) -> tuple[float, float, list[int]]:
    """ms per token (wall, CPU) of `tokens` greedy steps after a prefill, and the tokens."""
    tok = decoder.prefill(0, [PROMPT]).argmax(-1)
    pos, out = torch.tensor([len(PROMPT)]), []
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(tokens):
        tok = decoder.decode(tok, pos).argmax(-1)
        pos = pos + 1
        out.append(int(tok))
    return (time.perf_counter() - wall) / tokens * 1e3, (time.process_time() - cpu) / tokens * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="git commit whose server/decoder.py is the baseline")
    ap.add_argument("--models", required=True, help="comma-separated model folders")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if missing := [m for m in args.models.split(",") if not (Path(m) / "config.json").is_file()]:
        ap.error(f"--models: no model folder at {', '.join(missing)}")
    base = decoder_at(args.base)
    rows = []
    for folder in args.models.split(","):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        layout = plan_layout(model)
        decoders = {"base": base.StaticDecoder(model, layout, max_slots=1, max_len=512),
                    "new": current.StaticDecoder(model, layout, max_slots=1, max_len=512)}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in decoders}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            for name, decoder in decoders.items():
                wall, cpu, tokens[name] = one_round(decoder, args.tokens)
                times[name].append((wall, cpu))
        med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
        rows.append(row := {"model": Path(folder).name, "base_ms": round(med["base"][0], 2), "new_ms": round(med["new"][0], 2),
                            "speedup": round(med["base"][0] / med["new"][0], 3), "base_cpu_ms": round(med["base"][1], 2),
                            "new_cpu_ms": round(med["new"][1], 2), "cpu_speedup": round(med["base"][1] / med["new"][1], 3),
                            "same_tokens": tokens["base"] == tokens["new"]})
        print(json.dumps(row), flush=True)
    print(f"\nbase: server/decoder.py at {args.base}; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(tables.markdown(rows, [
        ("model", lambda r: r["model"]), ("base ms/token", lambda r: f"{r['base_ms']:.2f}"), ("new ms/token", lambda r: f"{r['new_ms']:.2f}"),
        ("speed-up", lambda r: f"{r['speedup']:.3f}"), ("base CPU ms", lambda r: f"{r['base_cpu_ms']:.2f}"),
        ("new CPU ms", lambda r: f"{r['new_cpu_ms']:.2f}"), ("CPU speed-up", lambda r: f"{r['cpu_speedup']:.3f}"),
        ("same tokens", lambda r: r["same_tokens"])]))
    tables.save_json(args.json, rows)
    print("command:", tables.command())


if __name__ == "__main__":
    main()
