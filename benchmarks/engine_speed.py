"""Decode speed of the parent and its members on each serving engine, against the bytes and the bandwidth.

    python benchmarks/engine_speed.py --parent runs/parent-smollm2-135m --members runs/family-smollm2-135m \
        --engines torch,vllm --concurrency 1,16 --json runs/bench/engine_speed.json

Every model is served by a real worker process (`family worker ARGS`) on a free loopback port and
driven over HTTP with streaming completions (`ignore_eos`, a short prompt; greedy unless --temperature
and --top-p say how to sample, as chat clients do), so every
request decodes exactly --max-tokens tokens. Reported per (engine, model, concurrency): tokens/s = all
generated tokens / wall time of a batch of `c` concurrent requests (median of --repeats batches; at
c=1 this is one stream's decode speed), TPOT at c=1; the speed-up over the parent on the same engine,
and that speed-up as a fraction of the parent/member bytes ratio (a memory-bound decoder reaches 1.0);
for the parent, its tokens/s as a fraction of the bandwidth roofline: memory bandwidth (measured here
first: family/bandwidth.py, a read of a buffer the size of the parent's weights, best of N) / bytes
read per step (the weights once, plus each row's KV cache at c > 1), times the rows of the step.
Targets of issue 11: members ≥ 0.9 of their bytes ratio at c=1 on the default engine and ≥ 0.8 on
vLLM-CPU; the parent on the default engine ≥ 0.6 of the roofline.

--engines: names from ENGINES below, or `label=worker arguments` for any other engine path, e.g.
`--engines "torch,vllm,torch-bf16=--engine torch --dtype bfloat16"`; the roofline is taken at the
dtype the arguments give (`--dtype`, float32 when absent or `auto`). A new engine path is one line
in ENGINES (or one --engines entry), nothing else.

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


# label → `family worker` arguments (besides the model, name, port and sizes). The first is the default
# serving engine, the one the targets are judged on.
ENGINES: dict[str, list[str]] = {
    "torch": ["--engine", "torch", "--dtype", "float32"],  # the embedded engine (`family serve`'s default)
    "vllm": ["--engine", "vllm", "--dtype", "float32"],  # vLLM-CPU as `family worker` starts it (compiled; --eager for eager)
}
DEFAULT_ENGINE = "torch"


def engine_specs(text: str) -> dict[str, list[str]]:
    """`torch,vllm,label=--engine torch --dtype bfloat16` → label → worker arguments."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        label, _, args = item.partition("=")
        if args:
            out[label] = shlex.split(args)
        elif label in ENGINES:
            out[label] = ENGINES[label]
        else:
            raise SystemExit(f"unknown engine {label!r}: one of {', '.join(ENGINES)}, or label=worker arguments")
    return out


def engine_dtype(args: list[str]) -> str:
    """The weights' dtype the engine serves at, for the roofline (float32 where not given or `auto`)."""
    dtype = args[args.index("--dtype") + 1] if "--dtype" in args[:-1] else "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def start_worker(engine_args: list[str], model_dir: Path, name: str, port: int, log: Path, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "family.cli", "worker", *engine_args, "--member-dir", str(model_dir), "--name", name,
           "--port", str(port), "--max-model-len", "1024", "--max-batch", str(max_batch)]
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)


def one_request(url: str, name: str, max_tokens: int, sampling: dict | None = None) -> dict:
    """One streamed completion; `sampling`: the request's temperature and top_p (greedy without it)."""
    body = {"model": name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **(sampling or {}), "ignore_eos": True,
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


def measure(url: str, name: str, concurrency: int, max_tokens: int, repeats: int, sampling: dict | None = None) -> dict:
    rates, ttfts, tpots = [], [], []
    with cf.ThreadPoolExecutor(concurrency) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = list(pool.map(lambda _: one_request(url, name, max_tokens, sampling), range(concurrency)))
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


def bench_engine(label: str, engine_args: list[str], models: list[tuple[str, Path]], args, log_dir: Path, out: dict, save) -> None:
    """Each model on its own worker, every concurrency; results saved after each (`save`), so a run cut
    short (vLLM-CPU start-up on two cores, a deadline) keeps what it measured. `--engine-budget-s`:
    after that long on one engine, the remaining cells are skipped and marked so. Fills `out`."""
    start = time.monotonic()
    for name, d in models:
        if time.monotonic() - start > args.engine_budget_s:
            out[name] = {"skipped": f"engine budget of {args.engine_budget_s:.0f} s spent"}
            continue
        port = free_port()
        t0 = time.monotonic()
        proc = start_worker(engine_args, d, name, port, log_dir / f"{label}-{name}.log", max(args.concurrency))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, timeout=args.startup_timeout, proc=proc)
            out[name] = {"startup_s": time.monotonic() - t0}
            one_request(url, name, 16)  # warm-up
            for c in args.concurrency:
                if time.monotonic() - start > args.engine_budget_s:
                    out[name][str(c)] = {"skipped": f"engine budget of {args.engine_budget_s:.0f} s spent"}
                    continue
                out[name][str(c)] = measure(url, name, c, args.max_tokens, args.repeats, args.sampling)
                print(f"  {label:10s} {name:24s} c={c:<3d} {out[name][str(c)]['tokens_per_s']:8.1f} tok/s", flush=True)
                save()
        except Exception as exc:  # a worker that does not start or fails: recorded, the table goes on
            out[name] = {**out.get(name, {}), "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(f"  {label:10s} {name:24s} failed: {out[name]['error']}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        save()


def _rate(r: dict | None, c: int) -> float | None:
    cell = (r or {}).get(str(c)) or {}
    return cell.get("tokens_per_s")


def roofline(bw: float, parent_bytes: int, kv_bytes_per_token: int, c: int, context: int) -> float:
    from family.bandwidth import roofline_tok_s

    return roofline_tok_s(bw, parent_bytes, batch=c, kv_bytes_per_token=kv_bytes_per_token, context=context if c > 1 else 0)


def table(results: dict, models: list[tuple[str, Path]], parent: str, params: dict, concurrency: list[int], labels: dict,
          engines: dict[str, list[str]], bandwidth: float, kv_bytes_per_token: int, context: int) -> str:
    """Markdown: per engine and model, tok/s, speed-up and speed-up / bytes ratio at each c; the parent's
    fraction of the roofline; the targets at c=1."""
    head = " | ".join(f"tok/s c={c} | speed-up c={c} | of bytes ratio c={c}" for c in concurrency)
    roof = " | ".join(f"of roofline c={c}" for c in concurrency)
    rows = [f"| engine | model | MB | bytes ratio | {head} | {roof} | TPOT ms c={concurrency[0]} | target |",
            "|---|---|---|---|" + "---|---|---|" * len(concurrency) + "---|" * len(concurrency) + "---|---|"]
    c0 = concurrency[0]
    for engine, per_model in results.items():
        base = per_model.get(parent)
        per_value = {"float32": 4, "bfloat16": 2, "float16": 2}[engine_dtype(engines[engine])]
        for name, _ in models:
            r = per_model.get(name)
            if r is None:
                continue
            ratio = params[parent] / params[name]
            cells, roofs = [], []
            for c in concurrency:
                rate, b = _rate(r, c), _rate(base, c)
                cells += ["-" if rate is None else f"{rate:.1f}", f"{rate / b:.2f}" if rate and b else "-",
                          f"{rate / b / ratio:.2f}" if rate and b and name != parent else "-"]
                top = roofline(bandwidth, params[parent] * per_value, kv_bytes_per_token, c, context) if name == parent else None
                roofs.append(f"{rate / top:.2f}" if rate and top else "-")
            target = "-"
            if name != parent and _rate(r, c0) and _rate(base, c0):
                need = 0.9 if engine == DEFAULT_ENGINE else 0.8
                got = _rate(r, c0) / _rate(base, c0) / ratio
                target = f"≥ {need} of bytes ratio: {'met' if got >= need else 'missed'}"
            elif name == parent and engine == DEFAULT_ENGINE and _rate(r, c0):
                got = _rate(r, c0) / roofline(bandwidth, params[parent] * per_value, kv_bytes_per_token, c0, context)
                target = f"≥ 0.6 of roofline: {'met' if got >= 0.6 else 'missed'}"
            note = next((r[k] for k in ("error", "skipped") if k in r), None)
            tpot = ((r.get(str(c0)) or {}).get("tpot_ms_median"))
            rows.append(f"| {engine} | {labels[name]} | {params[name] * per_value / 1e6:.0f} | {ratio:.2f} | " + " | ".join(cells)
                        + " | " + " | ".join(roofs) + f" | {'-' if tpot is None else f'{tpot:.1f}'} | {note or target} |")
    return "\n".join(rows)


def _parameters(model_dir: Path) -> int:
    from family.registry import _count_parameters

    return _count_parameters(Path(model_dir))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", type=Path, default=defaults.DEFAULT_PARENT_DIR)
    ap.add_argument("--members", default=None, help="family folder, or comma list of member folders")
    ap.add_argument("--fractions", default="0.8,0.6", help="without --members: plain-SVD members at these fractions")
    ap.add_argument("--engines", default="torch,vllm", help=f"labels ({', '.join(ENGINES)}) or label=worker arguments")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature > 0: nucleus sampling")
    ap.add_argument("--bandwidth-repeats", type=int, default=defaults.BANDWIDTH_REPEATS)
    ap.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a worker may take to answer /health")
    ap.add_argument("--engine-budget-s", type=float, default=float("inf"), help="stop measuring an engine after this long")
    ap.add_argument("--work-dir", type=Path, default=defaults.RUNS_DIR / "bench" / "engine_speed")
    ap.add_argument("--json", type=Path, default=defaults.RUNS_DIR / "bench" / "engine_speed.json")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        ap.error(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
    args.sampling = {"temperature": args.temperature, "top_p": args.top_p}
    engines = engine_specs(args.engines)
    command = shlex.join(["python", *sys.argv])
    args.work_dir.mkdir(parents=True, exist_ok=True)

    parent = "parent"
    models: list[tuple[str, Path]] = [(parent, args.parent)]
    labels = {parent: "parent (dense)"}
    if args.members:
        paths = [Path(p) for p in args.members.split(",")]
        if len(paths) == 1 and not (paths[0] / "config.json").is_file():
            paths = sorted(p for p in paths[0].iterdir() if (p / "config.json").is_file() and p.resolve() != args.parent.resolve()
                           and (p / "provenance.json").is_file() and json.loads((p / "provenance.json").read_text()).get("method") != "parent")
        models += [(p.name, p) for p in paths]
        labels.update({p.name: p.name for p in paths})
    else:
        for name, d in make_svd_members(args.parent, [float(f) for f in args.fractions.split(",")], args.work_dir / "members"):
            models.append((name, d))
            labels[name] = f"{name} (plain SVD, speed only)"
    params = {name: _parameters(d) for name, d in models}
    from family.bandwidth import measure_bandwidth
    from family.registry import kv_values_per_token

    kv_bytes = (kv_values_per_token(json.loads((args.parent / "config.json").read_text())) or 0) * 4
    context = len(PROMPT.split()) * 2 + args.max_tokens // 2  # mean context per row while decoding (prompt ≈ 2 tokens a word)
    bw = measure_bandwidth(params[parent] * 4, args.bandwidth_repeats)
    print(f"memory bandwidth {bw.bytes_per_s / 1e9:.1f} GB/s (best of {bw.repeats} reads of {bw.buffer_bytes / 1e9:.2f} GB, "
          f"{bw.threads} threads, best kernel {bw.kernel}; per kernel " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw.per_kernel.items())
          + f"); the parent's roofline at c=1, float32: {bw.bytes_per_s / (params[parent] * 4):.1f} tok/s", flush=True)

    results: dict = {}
    header = (f"Decode tokens/s, {args.max_tokens} tokens per request (ignore_eos, temperature {args.temperature}, top_p {args.top_p}), median of {args.repeats} batches, "
              f"{platform.machine()} CPU with {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}; memory bandwidth "
              f"{bw.bytes_per_s / 1e9:.1f} GB/s (best {bw.kernel} read of {bw.buffer_bytes / 1e9:.2f} GB, best of {bw.repeats}).\n\n`{command}`\n")

    def save() -> None:
        md = table(results, models, parent, params, args.concurrency, labels, engines, bw.bytes_per_s, kv_bytes, context)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": command, "max_tokens": args.max_tokens, "sampling": args.sampling, "repeats": args.repeats, "concurrency": args.concurrency,
            "engines": engines, "default_engine": DEFAULT_ENGINE, "parameters": params,
            "bandwidth": {"bytes_per_s": bw.bytes_per_s, "buffer_bytes": bw.buffer_bytes, "kernel": bw.kernel, "repeats": bw.repeats,
                          "threads": bw.threads, "per_kernel": bw.per_kernel, "best_s": bw.best_s},
            "kv_bytes_per_token": kv_bytes, "context": context,
            "models": {n: str(d) for n, d in models}, "results": results, "header": header, "table": md,
        }, indent=2))

    for label, engine_args in engines.items():
        print(f"engine {label}: family worker {shlex.join(engine_args)}", flush=True)
        results[label] = {}
        bench_engine(label, engine_args, models, args, args.work_dir, results[label], save)
        save()
    save()
    md = table(results, models, parent, params, args.concurrency, labels, engines, bw.bytes_per_s, kv_bytes, context)
    print("\n" + header + "\n" + md, flush=True)


if __name__ == "__main__":
    main()
