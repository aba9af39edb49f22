"""Latency the gateway adds over calling a worker directly: p50 and p99 at rising open-loop rates.

    python benchmarks/gateway_overhead.py --rates 50,100,200 --seconds 10

Only the gateway is measured, so the upstream is a stub that answers instantly (a raw asyncio HTTP/1.1
server in its own process, OpenAI-shaped: /health, /metrics, /v1/chat/completions). The gateway is
the real `family serve --fleet` in its own process, in front of that stub, over a tiny two-member
family built in a temporary folder. Requests through the gateway are routed (`model` is the family
name, with a latency budget), so each one is validated, tokenized, routed, relayed and observed.

The load generator is a raw asyncio HTTP/1.1 client on keep-alive connections (so its own cost is
small and equal for both paths). At each rate R it sends Poisson arrivals at 2R, alternating direct
and through-gateway requests, so each path gets R req/s and both see the same machine state (this
machine is shared). Latency runs from writing a request to reading its last byte. The table shows
both paths side by side and the difference: what the gateway adds, and the gateway process's CPU time
per request it served (user + system, from /proc): on a machine shared with other jobs the wall-clock
figures move with their load, the CPU time much less.

`--features all` turns on what issue 12 added to the request path, as a production key would use it:
an API key (keys file) with token quotas per minute and per day (reserved and settled per request in
the in-memory state store), an explicit priority (`x-priority`), a session id (`x-session-id`: affinity
lookups and updates, a few sessions in turn), and `--stream` makes requests streamed (the only ones a
first-token deadline applies to; the stub then answers with server-sent events). Tracing stays at its
default, off. `--features none` (the default) measures the bare routed path.

`--floor` adds a third path in the same run: a pass-through proxy on the gateway's own stack (uvicorn
with uvloop and httptools, one aiohttp session upstream, as `family serve` uses them) that forwards
the body bytes and relays the answer, with no routing, validation or accounting. What it adds is what
any proxy in Python on this stack costs on this machine; the gateway's added latency minus the
floor's is what the gateway's own work costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from family.profile import wait_healthy  # noqa: E402

DEVICE = "bench"
COMPLETION = {
    "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": "stub",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
}
STREAM = (b'data: {"id":"chatcmpl-stub","object":"chat.completion.chunk","created":0,"model":"stub","choices":[{"index":0,'
          b'"delta":{"role":"assistant","content":"ok"},"finish_reason":null}]}\n\n'
          b'data: {"id":"chatcmpl-stub","object":"chat.completion.chunk","created":0,"model":"stub","choices":[{"index":0,'
          b'"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":1,"total_tokens":9}}\n\n'
          b'data: [DONE]\n\n')
METRICS = b'vllm:num_requests_running{model_name="stub"} 0.0\nvllm:num_requests_waiting{model_name="stub"} 0.0\n'


# --- the stub upstream ---------------------------------------------------------------------------


class _StubProtocol(asyncio.Protocol):
    """Answers every complete HTTP/1.1 request on the connection at once (keep-alive)."""

    def connection_made(self, transport):
        self.transport, self.buf = transport, b""

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            if len(self.buf) < end + 4 + length:
                return
            content = self.buf[end + 4:end + 4 + length]
            stream = b'"stream":true' in content or b'"stream": true' in content
            self.buf = self.buf[end + 4 + length:]
            path = head.split(" ", 2)[1]
            if path == "/metrics":
                body, kind = METRICS, b"text/plain"
            elif path == "/health":
                body, kind = b'{"status":"ok"}', b"application/json"
            elif stream:
                body, kind = STREAM, b"text/event-stream"
            else:
                body, kind = json.dumps(COMPLETION).encode(), b"application/json"
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\ncontent-length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)


def passthrough_app(upstream: str):
    """The floor: a raw ASGI app that relays each POST to `upstream` through the gateway's own upstream
    session (server.gateway.upstream_session: the same pool and keep-alive settings)."""
    from server.gateway import upstream_session

    session = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            session.append(upstream_session())
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await session[0].close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        method = scope["method"].lower()
        async with getattr(session[0], method)(upstream + scope["path"], data=body or None,
                                               headers={"content-type": "application/json"}) as r:
            kind = r.headers.get("content-type", "application/json").encode()
            if kind.startswith(b"text/event-stream"):
                await send({"type": "http.response.start", "status": r.status, "headers": [(b"content-type", kind)]})
                async for chunk in r.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            content = await r.read()
        await send({"type": "http.response.start", "status": r.status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    return app


async def _run_stub(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(_StubProtocol, "127.0.0.1", p) for p in ports]
    await asyncio.gather(*(s.serve_forever() for s in servers))


# --- the open-loop client ------------------------------------------------------------------------


class Client:
    """Raw HTTP/1.1 POSTs over a pool of keep-alive connections to one host:port."""

    def __init__(self, port: int, headers: list[dict[str, str]] | None = None):
        """`headers`: extra request headers, one set per request in turn (e.g. a few session ids)."""
        self.port, self.idle, self.sent = port, [], 0
        self.extra = ["".join(f"{k}: {v}\r\n" for k, v in h.items()) for h in headers or [{}]]

    async def post(self, path: str, body: bytes) -> float:
        extra = self.extra[self.sent % len(self.extra)]
        self.sent += 1
        req = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n{extra}"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
        while True:
            reused = bool(self.idle)
            reader, writer = self.idle.pop() if reused else await asyncio.open_connection("127.0.0.1", self.port)
            t0 = time.perf_counter()
            writer.write(req)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                break
            except asyncio.IncompleteReadError as exc:  # the server closed an idle keep-alive connection: once more
                writer.close()
                if not reused or exc.partial:
                    raise
        lines = [line.lower() for line in head.split(b"\r\n")]
        if b"transfer-encoding: chunked" in lines:  # a streamed answer: read to the last (empty) chunk
            content = await reader.readuntil(b"0\r\n\r\n")
        else:
            length = int(next(line.split(b":", 1)[1] for line in lines if line.startswith(b"content-length")))
            content = await reader.readexactly(length)
        elapsed = time.perf_counter() - t0
        self.idle.append((reader, writer))
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{head.split(b' ', 2)[1].decode()} {content[:200].decode(errors='replace')}")
        return elapsed

    def close(self) -> None:
        for _, w in self.idle:
            w.close()


async def open_loop(targets: list[tuple[Client, str, bytes]], rate: float, seconds: float, seed: int) -> list[tuple[list[float], int]]:
    """Poisson arrivals at `rate` per target (len(targets)·rate in all), round-robin over the targets;
    per target: latencies of the requests that succeeded, and the number that failed."""
    rng = random.Random(seed)
    results: list[tuple[list[float], list[int]]] = [([], [0]) for _ in targets]

    async def one(i: int) -> None:
        client, path, body = targets[i]
        try:
            results[i][0].append(await client.post(path, body))
        except Exception as exc:
            results[i][1][0] += 1
            if results[i][1][0] <= 3:
                print(f"request failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    tasks, start, t, k = [], time.perf_counter(), 0.0, 0
    while t < seconds:
        t += rng.expovariate(rate * len(targets))
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(k % len(targets))))
        k += 1
    await asyncio.gather(*tasks)
    return [(lat, err[0]) for lat, err in results]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=1000, method="inclusive")[round(q * 1000) - 1] if len(xs) > 1 else float("nan")


# --- setup ---------------------------------------------------------------------------------------


def build_family(root: Path) -> str:
    """A tiny two-member family with accuracy and latency figures on the `bench` device class."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from family.registry import AccuracyRecord, LatencyProfile, load_family, sync_family
    from plrd.factorize import count_parameters, factorize
    from tests.conftest import make_tiny_parent

    parent_dir = make_tiny_parent(root / "bench-p100")
    parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32)
    member = factorize(parent, 0.6, count_parameters(parent), grams=None, allocation="uniform", progress=False)
    member.save_pretrained(root / "bench-p60")
    AutoTokenizer.from_pretrained(parent_dir).save_pretrained(root / "bench-p60")
    (root / "bench-p60" / "provenance.json").write_text('{"method": "benchmark"}')
    sync_family(root, parent_dir=parent_dir, family_name="bench")
    fam = load_family(root)
    model = {"bench-p100": (0.4, 0.04), "bench-p60": (0.03, 0.005)}  # ttft a0, tpot b0 (seconds)
    for m in fam.registry.members:
        a0, b0 = model[m.name]
        m.accuracy.append(AccuracyRecord(metric="chat_agreement", value=1.0 if m.is_parent else 0.7, data="benchmark"))
        m.latency[DEVICE] = LatencyProfile(device_class=DEVICE, engine="stub", latency_model=dict(a0=a0, a1=0, a2=0, a3=0, b0=b0, b1=0, b2=0))
    fam.save()
    return fam.registry.name


def _use_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


BENCH_KEY = "sk-bench-gateway-overhead"
SESSIONS = 8  # session ids sent in turn with --features all


def gateway_headers(features: str) -> list[dict[str, str]]:
    if features == "none":
        return [{}]
    return [{"authorization": f"Bearer {BENCH_KEY}", "x-priority": "standard", "x-session-id": f"bench-session-{i}"}
            for i in range(SESSIONS)]


def keys_file(path: Path) -> Path:
    """One key with token quotas far above what the benchmark spends (reserved and settled, never refused)."""
    from server.keys import hash_key

    path.write_text(f"keys:\n  - sha256: {hash_key(BENCH_KEY)}\n    name: bench\n    tokens_per_minute: 1000000000\n"
                    f"    tokens_per_day: 100000000000\n")
    return path


async def _measure(name: str, stub_port: int, gw_port: int, gw_pid: int, args, floor_port: int | None = None) -> list[dict]:
    messages = [{"role": "user", "content": "Say hello to the family gateway benchmark."}]
    extra = {"stream": True} if args.stream else {}
    routed = json.dumps({"model": name, "messages": messages, "max_tokens": 16, **extra,
                         "budget": {"max_latency_ms": 500}}).encode()  # routes to bench-p60 (p100 would take 1 s)
    direct = json.dumps({"model": f"{name}-p60", "messages": messages, "max_tokens": 16, **extra}).encode()
    path = "/v1/chat/completions"
    d_client, g_client = Client(stub_port), Client(gw_port, gateway_headers(args.features))
    targets = [(d_client, path, direct), (g_client, path, routed)]
    if floor_port is not None:  # the pass-through proxy forwards the direct request as is
        targets.append((Client(floor_port), path, direct))
    await open_loop(targets, 100, args.warmup / 100, seed=1)  # warm connections and caches
    rows = []
    for i, rate in enumerate(float(r) for r in args.rates.split(",")):
        cpu0 = cpu_seconds(gw_pid)
        (d, d_err), (g, g_err), *floor = await open_loop(targets, rate, args.seconds, seed=100 + i)
        cpu = cpu_seconds(gw_pid) - cpu0
        row = {"rate": rate, "n": len(d) + len(g), "errors": d_err + g_err,
               "gateway_cpu_ms": cpu / max(1, len(g) + g_err) * 1e3,
               "direct_p50_ms": pct(d, 0.5) * 1e3, "direct_p99_ms": pct(d, 0.99) * 1e3,
               "gateway_p50_ms": pct(g, 0.5) * 1e3, "gateway_p99_ms": pct(g, 0.99) * 1e3}
        row["added_p50_ms"] = row["gateway_p50_ms"] - row["direct_p50_ms"]
        row["added_p99_ms"] = row["gateway_p99_ms"] - row["direct_p99_ms"]
        if floor:
            (f, f_err), = floor
            row["n"], row["errors"] = row["n"] + len(f), row["errors"] + f_err
            row["floor_added_p50_ms"] = (pct(f, 0.5) - pct(d, 0.5)) * 1e3
            row["floor_added_p99_ms"] = (pct(f, 0.99) - pct(d, 0.99)) * 1e3
        rows.append(row)
    for client, _, _ in targets:
        client.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="50,100,200", help="requests per second on each path, comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0, help="per rate")
    ap.add_argument("--warmup", type=int, default=300, help="requests per path before measuring")
    ap.add_argument("--nice", type=int, default=0,
                    help="raise this process tree's priority by N (needs root): shields the measurement from other "
                         "CPU-bound jobs on a shared machine; 0 measures as is")
    ap.add_argument("--features", choices=("none", "all"), default="none",
                    help="all: an API key with token quotas, x-priority and x-session-id (affinity) on every gateway request")
    ap.add_argument("--stream", action="store_true", help="streamed requests (first-token deadlines apply to these only)")
    ap.add_argument("--floor", action="store_true",
                    help="also measure a pass-through proxy on the same stack (uvicorn + aiohttp, no gateway logic), in the same run")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--stub", help=argparse.SUPPRESS)  # internal: run the stub upstream on these ports
    ap.add_argument("--passthrough", help=argparse.SUPPRESS)  # internal: run the floor proxy, PORT,UPSTREAM_PORT
    args = ap.parse_args()
    if args.stub:
        asyncio.run(_run_stub([int(p) for p in args.stub.split(",")]))
        return
    if args.passthrough:
        import uvicorn

        port, upstream = args.passthrough.split(",")
        uvicorn.run(passthrough_app(f"http://127.0.0.1:{upstream}"), host="127.0.0.1", port=int(port), log_level="warning", access_log=False)
        return

    from family.profile import free_port

    command = shlex.join(["python", *sys.argv])
    if args.nice:
        os.nice(-args.nice)  # inherited by the stub and the gateway
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        name = build_family(tmp / "family")
        stub_port, other_port, gw_port = free_port(), free_port(), free_port()
        (tmp / "fleet.yaml").write_text(
            f"workers:\n  - url: http://127.0.0.1:{other_port}\n    member: {name}-p100\n    device_class: {DEVICE}\n"
            f"  - url: http://127.0.0.1:{stub_port}\n    member: {name}-p60\n    device_class: {DEVICE}\n"
        )
        procs = [subprocess.Popen([sys.executable, __file__, "--stub", f"{stub_port},{other_port}"])]
        keys = ["--api-keys", str(keys_file(tmp / "keys.yaml"))] if args.features == "all" else []
        procs.append(subprocess.Popen([sys.executable, "-m", "family.cli", "serve", "--family", str(tmp / "family"),
                                       "--fleet", str(tmp / "fleet.yaml"), "--port", str(gw_port), *keys], cwd=ROOT))
        floor_port = free_port() if args.floor else None
        if floor_port is not None:
            procs.append(subprocess.Popen([sys.executable, __file__, "--passthrough", f"{floor_port},{stub_port}"]))
        try:
            wait_healthy(f"http://127.0.0.1:{stub_port}", 120)
            wait_healthy(f"http://127.0.0.1:{gw_port}", 120)
            if floor_port is not None:
                wait_healthy(f"http://127.0.0.1:{floor_port}", 120)
            rows = asyncio.run(_measure(name, stub_port, gw_port, procs[1].pid, args, floor_port))
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=10)
    load = (load_before, os.getloadavg()[0])
    print(f"\n{command}\n{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} CPU cores, loopback, stub upstream, "
          f"1-min load average {load[0]:.1f} before / {load[1]:.1f} after, priority +{args.nice}, features {args.features}, "
          f"{'streamed' if args.stream else 'whole'} responses\n")
    floor = args.floor
    print("| req/s per path | requests | errors | direct p50 ms | gateway p50 ms | added p50 ms | direct p99 ms | gateway p99 ms | added p99 ms "
          "| gateway CPU ms/request |" + (" floor added p50 ms | floor added p99 ms |" if floor else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if floor else ""))
    for r in rows:
        print(f"| {r['rate']:.0f} | {r['n']} | {r['errors']} | {r['direct_p50_ms']:.3f} | {r['gateway_p50_ms']:.3f} | {r['added_p50_ms']:.3f} | "
              f"{r['direct_p99_ms']:.3f} | {r['gateway_p99_ms']:.3f} | {r['added_p99_ms']:.3f} | {r['gateway_cpu_ms']:.3f} |"
              + (f" {r['floor_added_p50_ms']:.3f} | {r['floor_added_p99_ms']:.3f} |" if floor else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "load_average": load, "nice": args.nice, "features": args.features,
                                         "stream": args.stream, "rows": rows}, indent=2))


if __name__ == "__main__":
    _use_uvloop()
    main()
