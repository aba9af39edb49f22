"""Decode speed of the parent and its members on each serving engine (vLLM, embedded torch), one run.

    python benchmarks/engine_speed.py --parent runs/parent-smollm2-135m [--members DIR] \
        --engines vllm,torch --concurrency 1,16 --json runs/bench/engine_speed.json

Every model is served by a real worker process (`family worker --engine E`) on a free loopback port and
driven over HTTP with streaming completions (`ignore_eos`, temperature 0, a short prompt), so every
request decodes exactly --max-tokens tokens. Reported per (engine, model, concurrency): tokens/s = all
generated tokens / wall time of a batch of `c` concurrent requests (median of --repeats batches; at
c=1 this is one stream's decode speed), TPOT at c=1, and the speed-up over the parent on the same
engine next to the parent/member byte ratio, which a memory-bound decoder should approach. The target
of the issue: speed-up at c=1 on vLLM ≥ 0.9 × byte ratio.

--members: a family folder (its subfolders holding a config.json) or a comma list of member folders.
Without it, members are made here by *plain truncated SVD* at --fractions of the parent's parameters
(one rank fraction for every projection); their text is meaningless, their speed is that of any member
with those shapes, and the table labels them so.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from family import defaults  # noqa: E402
from family.profile import wait_healthy  # noqa: E402

PROMPT = "The history of the city begins"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def make_svd_members(parent_dir: Path, fractions: list[float], out_root: Path) -> list[tuple[str, Path]]:
    """Members by plain truncated SVD (one rank fraction for every projection) at each parameter fraction.

    Self-contained on purpose (float32 SVDs, computed once for all fractions): the members only need
    the right shapes for a speed measurement.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from family.lowrank import LowRankLlamaForCausalLM, lowrank_config_from, projection_paths

    todo = [(f, out_root / f"svd-p{round(f * 100)}") for f in fractions]
    if all((d / "config.json").is_file() for _, d in todo):
        return [(d.name, d) for _, d in todo]
    parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(parent_dir)
    total = sum(p.numel() for p in {id(p): p for p in parent.parameters()}.values())
    paths = projection_paths(parent.config.num_hidden_layers)
    weights = {p: parent.get_submodule(p).weight.detach() for p in paths}
    dense_params = sum(w.numel() for w in weights.values())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's threads spin when the machine is busy: one thread is 10x faster here
    svd = {p: torch.linalg.svd(w, full_matrices=False) for p, w in weights.items()}
    torch.set_num_threads(threads)
    for fraction, d in todo:
        budget = fraction * total - (total - dense_params)  # parameters left for the projections

        def ranks_at(phi: float) -> dict[str, int]:
            """rank = phi · min(out, in) per projection; None (stays dense) where factors are not smaller."""
            ranks = {p: max(1, round(phi * min(w.shape))) for p, w in weights.items()}
            return {p: r for p, r in ranks.items() if r * sum(weights[p].shape) < weights[p].numel()}

        def size(ranks: dict) -> int:
            return sum(ranks[p] * sum(w.shape) if p in ranks else w.numel() for p, w in weights.items())

        lo, hi = 0.0, 1.0  # the largest phi within budget (size grows with phi)
        for _ in range(40):
            lo, hi = ((lo + hi) / 2, hi) if size(ranks_at((lo + hi) / 2)) <= budget else (lo, (lo + hi) / 2)
        ranks = ranks_at(lo)
        member = LowRankLlamaForCausalLM(lowrank_config_from(parent.config, ranks)).eval()
        state = {k: v for k, v in parent.state_dict().items() if not k.startswith(tuple(p + "." for p in ranks))}
        for p, r in ranks.items():  # projections absent from ranks keep the parent's dense weight
            U, S, Vh = svd[p]
            state[f"{p}.B.weight"], state[f"{p}.A.weight"] = (U[:, :r] * S[:r]).contiguous(), Vh[:r].contiguous()
        member.load_state_dict(state, strict=False)
        member.tie_weights()
        member.generation_config = parent.generation_config
        member.save_pretrained(d)
        tok.save_pretrained(d)
    return [(d.name, d) for _, d in todo]


def start_worker(engine: str, model_dir: Path, name: str, port: int, log: Path, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "family.cli", "worker", "--engine", engine, "--member-dir", str(model_dir), "--name", name,
           "--port", str(port), "--max-model-len", "1024", "--dtype", "float32", "--max-batch", str(max_batch)]
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)


def one_request(url: str, name: str, max_tokens: int) -> dict:
    body = {"model": name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"start": t0, "first": first, "end": time.perf_counter(), "tokens": tokens}


def measure(url: str, name: str, concurrency: int, max_tokens: int, repeats: int) -> dict:
    rates, ttfts, tpots = [], [], []
    with cf.ThreadPoolExecutor(concurrency) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = list(pool.map(lambda _: one_request(url, name, max_tokens), range(concurrency)))
            wall = time.perf_counter() - t0
            assert all(r["tokens"] == max_tokens for r in results), [r["tokens"] for r in results]
            rates.append(sum(r["tokens"] for r in results) / wall)
            ttfts += [r["first"] - r["start"] for r in results]
            tpots += [(r["end"] - r["first"]) / max(1, r["tokens"] - 1) for r in results]
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_all": rates,
        "ttft_ms_median": 1000 * statistics.median(ttfts),
        "tpot_ms_median": 1000 * statistics.median(tpots),
    }


def bench_engine(engine: str, models: list[tuple[str, Path]], args, log_dir: Path) -> dict:
    out = {}
    for name, d in models:
        port = free_port()
        t0 = time.monotonic()
        proc = start_worker(engine, d, name, port, log_dir / f"{engine}-{name}.log", max(args.concurrency))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, timeout=600, proc=proc)
            out[name] = {"startup_s": time.monotonic() - t0}
            one_request(url, name, 16)  # warm-up
            for c in args.concurrency:
                out[name][str(c)] = measure(url, name, c, args.max_tokens, args.repeats)
                print(f"  {engine:6s} {name:10s} c={c:<3d} {out[name][str(c)]['tokens_per_s']:8.1f} tok/s", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out


def table(results: dict, models: list[tuple[str, Path]], parent: str, sizes: dict, concurrency: list[int], labels: dict) -> str:
    head = " | ".join(f"tok/s c={c} | speed-up c={c}" for c in concurrency)
    rows = [f"| engine | model | MB | parent/member bytes | {head} | TPOT ms c={concurrency[0]} | target c={concurrency[0]} |",
            "|---|---|---|---|" + "---|---|" * len(concurrency) + "---|---|"]
    for engine, per_model in results.items():
        base = per_model.get(parent)
        for name, _ in models:
            if name not in per_model:
                continue
            r, ratio = per_model[name], sizes[parent] / sizes[name]
            cells = []
            for c in concurrency:
                rate = r[str(c)]["tokens_per_s"]
                cells += [f"{rate:.1f}", f"{rate / base[str(c)]['tokens_per_s']:.2f}" if base else "-"]
            target = "-"
            if name != parent and base:
                up = r[str(concurrency[0])]["tokens_per_s"] / base[str(concurrency[0])]["tokens_per_s"]
                target = f"≥ {0.9 * ratio:.2f} {'met' if up >= 0.9 * ratio else 'missed'}"
            rows.append(f"| {engine} | {labels[name]} | {sizes[name] / 1e6:.0f} | {ratio:.2f} | " + " | ".join(cells)
                        + f" | {r[str(concurrency[0])]['tpot_ms_median']:.1f} | {target} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", type=Path, default=defaults.DEFAULT_PARENT_DIR)
    ap.add_argument("--members", default=None, help="family folder, or comma list of member folders")
    ap.add_argument("--fractions", default="0.8,0.6", help="without --members: plain-SVD members at these fractions")
    ap.add_argument("--engines", default="vllm,torch")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", type=Path, default=defaults.RUNS_DIR / "bench" / "engine_speed")
    ap.add_argument("--json", type=Path, default=defaults.RUNS_DIR / "bench" / "engine_speed.json")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    command = shlex.join(["python", *sys.argv])
    args.work_dir.mkdir(parents=True, exist_ok=True)

    parent = "parent"
    models: list[tuple[str, Path]] = [(parent, args.parent)]
    labels = {parent: "parent (dense)"}
    if args.members:
        paths = [Path(p) for p in args.members.split(",")]
        if len(paths) == 1 and not (paths[0] / "config.json").is_file():
            paths = sorted(p for p in paths[0].iterdir() if (p / "config.json").is_file())
        models += [(p.name, p) for p in paths]
        labels.update({p.name: p.name for p in paths})
    else:
        for name, d in make_svd_members(args.parent, [float(f) for f in args.fractions.split(",")], args.work_dir / "members"):
            models.append((name, d))
            labels[name] = f"{name} (plain SVD, speed only)"
    sizes = {name: weight_bytes(d) for name, d in models}

    results = {}
    for engine in args.engines.split(","):
        print(f"engine {engine}", flush=True)
        results[engine] = bench_engine(engine, models, args, args.work_dir)

    md = table(results, models, parent, sizes, args.concurrency, labels)
    header = (f"Decode tokens/s, {args.max_tokens} tokens per request (ignore_eos), median of {args.repeats} batches, float32, "
              f"{platform.machine()} CPU with {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}.\n\n`{command}`\n")
    print("\n" + header + "\n" + md, flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "command": command, "max_tokens": args.max_tokens, "repeats": args.repeats, "concurrency": args.concurrency,
        "bytes": sizes, "models": {n: str(d) for n, d in models}, "results": results, "table": md,
    }, indent=2))


if __name__ == "__main__":
    main()
