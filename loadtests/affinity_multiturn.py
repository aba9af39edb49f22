"""Multi-turn chat with session affinity on and off, side by side in one run (issue 12, item 2).

One member on `--workers` workers (vLLM, whose automatic prefix caching is what affinity is for; or
the torch engine, which caches nothing: a control), and two gateways over the *same* workers, one
with `--affinity`, one with `--no-affinity`. `--sessions` conversations per gateway run at once, turn
by turn: each turn sends the whole conversation so far (a long system prompt, then the turns) as a
streamed chat completion with `x-session-id`, and appends the answer. The two arms interleave on the
same workers at the same time, with system prompts of the same length but different words, so
neither arm's cache serves the other. Reported per arm: TTFT per turn (p50/p90) from the second turn
on (the first turn has nothing cached anywhere), and how often a session changed workers.

    python -m loadtests.affinity_multiturn --family DIR --member NAME --engine vllm --device-class cpu-2core --out runs/affinity
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import yaml

from family.profile import wait_healthy
from family.registry import load_family
from loadtests.harness import LOOPBACK, free_port, start_family_cli, stop_process

WORDS = ("river valley mountain forest harbour station library market bridge garden tower meadow canal village orchard quarry "
         "lighthouse observatory archive workshop").split()


def system_prompt(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return "You are a patient guide. Background notes: " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def _turn(client: httpx.Client, url: str, member: str, messages: list[dict], session: str, max_tokens: int) -> tuple[float | None, str, str]:
    """One streamed turn: (TTFT s, answer text, worker)."""
    body = {"model": member, "messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    start = time.perf_counter()
    ttft, parts = None, []
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"x-session-id": session}) as r:
        r.raise_for_status()
        worker = r.headers.get("x-family-worker", "")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {}).get("content")
            if delta:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                parts.append(delta)
    return ttft, "".join(parts), worker


def _conversation(url: str, member: str, arm: str, k: int, turns: int, system_words: int, max_tokens: int, out: list, lock) -> None:
    seed = (0 if arm == "affinity_on" else 10_000) + k  # same lengths, different words per arm
    messages = [{"role": "system", "content": system_prompt(seed, system_words)}]
    previous = None
    with httpx.Client(timeout=300) as client:
        for t in range(turns):
            messages.append({"role": "user", "content": f"Question {t + 1}: tell me one more thing about the {WORDS[(seed + t) % len(WORDS)]}."})
            ttft, answer, worker = _turn(client, url, member, messages, f"{arm}-{k}", max_tokens)
            messages.append({"role": "assistant", "content": answer or "..."})
            with lock:
                out.append({"arm": arm, "session": k, "turn": t, "ttft_s": ttft, "worker": worker, "moved": previous is not None and worker != previous})
            previous = worker


def start_order(arms: list[str], sessions: int) -> list[tuple[int, str]]:
    """(session, arm) in the order the conversations start: interleaved, and the arm that starts first
    alternates per session (on, off, off, on, ...). Each gateway places its own requests, so two first
    turns often share a worker and the one that arrives first is prefilled first: always starting one
    arm first gave it a head start that looked like a 1.8-2.5× TTFT gain on vLLM-CPU (docs/results/reliability.md)."""
    return [(k, arm) for k in range(sessions) for arm in (arms if k % 2 == 0 else arms[::-1])]


def _stats(rows: list[dict]) -> dict:
    later = [r["ttft_s"] for r in rows if r["turn"] > 0 and r["ttft_s"] is not None]
    later.sort()
    q = lambda p: round(later[min(len(later) - 1, int(p * (len(later) - 1)))] * 1e3, 1) if later else None  # noqa: E731
    return {"turns": len(rows), "ttft_ms_turn2plus": {"p50": q(0.5), "p90": q(0.9), "mean": round(statistics.mean(later) * 1e3, 1) if later else None},
            "ttft_ms_turn1_p50": round(statistics.median([r["ttft_s"] for r in rows if r["turn"] == 0 and r["ttft_s"]]) * 1e3, 1)
            if any(r["turn"] == 0 and r["ttft_s"] for r in rows) else None,
            "worker_changes": sum(r["moved"] for r in rows)}


def affinity_multiturn(family_dir: Path, member: str, engine: str, device_class: str, out: Path, *, workers: int = 2, sessions: int = 4,
                       turns: int = 5, system_words: int = 300, max_tokens: int = 24, ready_timeout: float = 900) -> dict:
    out = Path(out)
    logs = out / "affinity-multiturn-logs"
    logs.mkdir(parents=True, exist_ok=True)
    fam = load_family(family_dir, verify="none")
    with ExitStack() as stack:
        procs, urls = [], []
        for i in range(workers):
            port = free_port()
            proc = start_family_cli(["worker", "--member-dir", str(fam.member_dir(member)), "--name", member, "--engine", engine,
                                     "--host", LOOPBACK, "--port", str(port)], logs / f"worker{i}.log")
            stack.callback(stop_process, proc, 60)
            procs.append(proc)
            urls.append(f"http://{LOOPBACK}:{port}")
        t0 = time.perf_counter()
        for url, proc in zip(urls, procs):
            wait_healthy(url, ready_timeout, proc, f"{engine} worker (log {logs})")
        startup_s = time.perf_counter() - t0
        fleet = {"workers": [{"url": u, "member": member, "device_class": device_class, "prefix_caching": engine == "vllm"} for u in urls]}
        (logs / "fleet.yaml").write_text(yaml.safe_dump(fleet, sort_keys=False))
        gateways = {}
        for arm, flag in (("affinity_on", "--affinity"), ("affinity_off", "--no-affinity")):
            port = free_port()
            proc = start_family_cli(["serve", "--family", str(family_dir), "--fleet", str(logs / "fleet.yaml"), "--host", LOOPBACK,
                                     "--port", str(port), "--device-class", device_class, "--health-interval", "0.5", flag], logs / f"gateway-{arm}.log")
            stack.callback(stop_process, proc)
            gateways[arm] = f"http://{LOOPBACK}:{port}"
            wait_healthy(gateways[arm], 120, proc, f"gateway {arm}")
        rows: list[dict] = []
        lock = threading.Lock()
        threads = [threading.Thread(target=_conversation, args=(gateways[arm], member, arm, k, turns, system_words, max_tokens, rows, lock))
                   for k, arm in start_order(list(gateways), sessions)]
        t1 = time.perf_counter()
        for th in threads:
            th.start()
            time.sleep(0.2)
        for th in threads:
            th.join(timeout=1800)
        arms = {arm: _stats([r for r in rows if r["arm"] == arm]) for arm in gateways}
        on, off = arms["affinity_on"]["ttft_ms_turn2plus"]["p50"], arms["affinity_off"]["ttft_ms_turn2plus"]["p50"]
        res = {"scenario": "affinity-multiturn", "engine": engine, "member": member, "workers": workers, "sessions_per_arm": sessions,
               "turns": turns, "system_words": system_words, "worker_startup_s": round(startup_s, 1), "run_s": round(time.perf_counter() - t1, 1),
               "arms": arms, "ttft_p50_gain": round(off / on, 2) if on and off else None, "rows": rows}
    (out / "affinity-multiturn.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", type=Path, required=True)
    ap.add_argument("--member", required=True)
    ap.add_argument("--engine", default="vllm", choices=["vllm", "torch"])
    ap.add_argument("--device-class", default="cpu-2core")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sessions", type=int, default=4, help="per arm; even, so that each arm starts first equally often")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--system-words", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("runs/affinity"))
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a `timeout` still stops the workers and gateways it started
    res = affinity_multiturn(args.family, args.member, args.engine, args.device_class, args.out, workers=args.workers,
                             sessions=args.sessions, turns=args.turns, system_words=args.system_words)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
