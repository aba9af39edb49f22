"""`family worker` and `family serve`: the serving commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from family import defaults


def resolve_members(member_dirs: list[Path] | None, family_dir: Path | None, members: list[str] | None) -> dict[str, Path]:
    """Served name → member folder, from --member-dir (repeatable; names from --name in the same order,
    else the folder names), or from --family with --member (repeatable; none = every servable member)."""
    from family.errors import FamilyError

    member_dirs, members = list(member_dirs or []), list(members or [])
    if member_dirs:
        if members and len(members) != len(member_dirs):
            raise FamilyError(f"{len(member_dirs)} --member-dir but {len(members)} --name: give one name per folder, or none")
        for d in member_dirs:
            if not (d / "config.json").is_file():
                raise FamilyError(f"not a model folder (no config.json): {d}")
        names = members or [d.name for d in member_dirs]
        if len(set(names)) != len(names):
            raise FamilyError(f"served names must differ: {', '.join(names)}")
        return dict(zip(names, member_dirs))
    if family_dir is None:
        raise FamilyError("give --member-dir DIR, or --family DIR (with --member NAME for some of its members)")
    from family.registry import load_family

    fam = load_family(family_dir)
    for name in members:
        if name in fam.problems:
            raise FamilyError(f"member {name!r} is not servable: {fam.problems[name]}")
    return {name: fam.member_dir(name) for name in (members or [m.name for m in fam.servable])}


def worker(
    member_dir: list[Path] = typer.Option(None, help="member folder to serve (repeat for several members in one worker)"),
    family_dir: Path = typer.Option(None, "--family", help="family folder (with --member, or alone for all its servable members)"),
    member: list[str] = typer.Option(None, "--member", "--name", help="member name, the served model id (repeatable)"),
    engine: str = typer.Option("torch", help="torch (embedded engine, several members per process) or vllm (one member)"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(defaults.WORKER_BASE_PORT),
    max_model_len: int = typer.Option(defaults.MAX_MODEL_LEN),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16, or (torch engine) auto: the faster of float32 and bfloat16 here"),
    max_batch: int = typer.Option(16, help="torch engine: requests decoded together, per member"),
    max_waiting: int = typer.Option(64, help="torch engine: queued requests per member before answering 429"),
    threads: int = typer.Option(0, help="torch engine: CPU threads for matmuls (0 = torch's default, one per core)"),
    layout: str = typer.Option("measure", help="torch engine: measure (each projection dense or factored, whichever is faster "
                                               "here), factored (as built) or dense (merged back)"),
    kernel: str = typer.Option("measure", help="torch engine: matmul kernel, measure (the faster here of aten and oneDNN on "
                                               "prepacked weights), aten or onednn"),
    compiled: Optional[bool] = typer.Option(None, "--compiled/--eager", help="vLLM: compile the model (torch.compile, and CUDA graphs on "
                                            "GPUs; decodes faster, starts slower; the default where a C++ compiler is found) or run it eagerly"),
) -> None:
    """Start one OpenAI-compatible worker for one member, or (torch) for several sharing one engine."""
    from family.errors import FamilyError

    members = resolve_members(member_dir, family_dir, member)
    if dtype not in ("float32", "bfloat16", "float16", "auto"):
        raise FamilyError(f"--dtype must be float32, bfloat16, float16 or auto, got {dtype!r}")
    if threads < 0:
        raise FamilyError(f"--threads must be 0 (default) or positive, got {threads}")
    if layout not in ("measure", "factored", "dense"):
        raise FamilyError(f"--layout must be measure, factored or dense, got {layout!r}")
    if kernel not in ("measure", "aten", "onednn"):
        raise FamilyError(f"--kernel must be measure, aten or onednn, got {kernel!r}")
    if compiled is not None and engine != "vllm":
        raise FamilyError("--compiled/--eager is for the vLLM engine (the torch engine's decode path is not compiled)")
    if engine == "vllm":
        if threads:
            raise FamilyError("--threads is for the torch engine; vLLM-CPU binds its own threads (VLLM_CPU_OMP_THREADS_BIND)")
        if len(members) != 1:
            raise FamilyError(f"vLLM serves one member per worker; got {len(members)} ({', '.join(members)})")
        if dtype == "auto":
            raise FamilyError("--dtype auto is for the torch engine")
        from server.worker_vllm import compiler_available, vllm_command, vllm_env

        if compiled is None:  # compiled decodes faster (README), but needs a C++ compiler to start
            compiled = compiler_available()
            if not compiled:
                typer.echo("note: no C++ compiler found (CXX or g++): vLLM runs eager (--enforce-eager)", err=True)

        (name, path), = members.items()
        cmd = vllm_command(path, name, port, host=host, max_model_len=max_model_len, dtype=dtype, eager=not compiled)
        os.execve(cmd[0], cmd, vllm_env())
    elif engine == "torch":
        import logging

        import torch
        import uvicorn

        from server.worker_torch import create_app

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        if threads:
            torch.set_num_threads(threads)
        app = create_app(members, max_model_len=max_model_len, max_batch=max_batch, max_waiting=max_waiting, dtype=dtype, layout=layout,
                         kernel=kernel)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    else:
        raise FamilyError(f"--engine must be torch or vllm, got {engine!r}")


def serve(
    family_dir: Path = typer.Option(defaults.DEFAULT_FAMILY_DIR, "--family", help="family folder (holds family.json)"),
    fleet: Path = typer.Option(None, help="fleet.yaml listing remote workers; without it, workers start here"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(defaults.GATEWAY_PORT),
    engine: str = typer.Option("torch", help="engine for local workers: torch or vllm"),
    device_class: str = typer.Option("cpu-2core", help="device class of local workers (selects their latency profiles)"),
    api_keys: Path = typer.Option(None, help="keys.yaml: hashed bearer keys with per-key budgets, caps, rate and concurrency limits (re-read when it changes)"),
    max_body_bytes: int = typer.Option(1 << 20, help="largest request body accepted (413 past it, checked while reading)"),
    static: bool = typer.Option(False, help="route from registry figures only (ignore live load): a baseline"),
    health_interval: float = typer.Option(2.0, help="seconds between worker health checks"),
    worker_threads: int = typer.Option(0, help="the local torch worker (one process for all members): CPU threads (0 = one per core)"),
    dtype: str = typer.Option("float32", help="local workers' serving dtype: float32, bfloat16 or float16 (routing reads each member's "
                                             "accuracy at the dtype its profile on --device-class was measured at)"),
    state: str = typer.Option("memory", help="where per-key token quotas live: memory (this replica) or redis://host:port/db "
                                             "(shared by every replica pointed at it)"),
    state_failure: str = typer.Option("open", help="when the --state Redis is unreachable: open (serve unreserved; default) or "
                                                   "closed (503 quota_state_unavailable)"),
    otel: str = typer.Option("none", envvar="OTEL_TRACES_EXPORTER",
                             help="OpenTelemetry traces, one span per request: none, console, or otlp (OTEL_EXPORTER_OTLP_ENDPOINT)"),
    worker_slots: int = typer.Option(8, help="requests the gateway sends one worker (per member) at once; past it they wait in the "
                                             "gateway's priority queue (a fleet entry's max_concurrent overrides it)"),
    max_queue_wait: float = typer.Option(10.0, help="seconds a request without a latency budget may wait for a worker slot "
                                                    "(sheddable: 1 s); then 503/429 with Retry-After"),
    affinity: bool = typer.Option(True, "--affinity/--no-affinity", help="session/user/prefix affinity (x-session-id, user, a long "
                                                                         "shared prompt prefix) with a load guard"),
    first_token_timeout: float = typer.Option(30.0, help="default first-token deadline of a streamed attempt, in seconds "
                                                         "(a budget's max_ttft_ms or max_latency_ms sets a tighter one)"),
) -> None:
    """Start the gateway: OpenAI-compatible API routing each request to the member fitting its budget.

    Without --fleet, workers start on this machine (a free port) and stop with the gateway: with the
    torch engine one `family worker` serving every servable member with all cores; with vLLM one per
    member. Members with no latency profile for a worker's device class only serve requests without
    latency limits (or with allow_best_effort)."""
    import gc
    import signal
    import sys

    import uvicorn

    from family.errors import FamilyError
    from family.registry import check_dtype, load_family
    from server.auth import Auth
    from server.fleet import LocalWorkers, load_fleet
    from server.gateway import create_app
    from server.limits import Limits
    from server.priority import RoutingPolicy
    from server.quotas import FAILURE_POLICIES
    from server.state import open_state
    from server.tracing import tracer_provider

    check_dtype(dtype)
    fam = load_family(family_dir)
    for name, why in fam.problems.items():
        typer.echo(f"refusing member {name}: {why}", err=True)
    if not fam.servable:
        raise FamilyError(f"no servable member in {family_dir}")
    if engine not in ("torch", "vllm"):
        raise FamilyError(f"--engine must be torch or vllm, got {engine!r}")
    if worker_threads < 0:
        raise FamilyError(f"--worker-threads must be 0 (one per core) or positive, got {worker_threads}")
    if max_body_bytes < 1024:
        raise FamilyError(f"--max-body-bytes must be at least 1024, got {max_body_bytes}")
    if worker_slots < 1 or max_queue_wait < 0 or first_token_timeout <= 0:
        raise FamilyError("--worker-slots must be ≥ 1, --max-queue-wait ≥ 0 and --first-token-timeout > 0")
    policy = RoutingPolicy(worker_slots=worker_slots, max_wait_s=max_queue_wait, affinity=affinity, first_token_s=first_token_timeout)
    auth = Auth.from_file(api_keys, members=set(fam.registry.names()))
    if state_failure not in FAILURE_POLICIES:
        raise FamilyError(f"--state-failure must be open or closed, got {state_failure!r}")
    state_backend = open_state(state)
    provider = tracer_provider(otel)
    # SIGTERM stops the gateway like Ctrl-C does, through the `finally` below that stops local workers
    # (uvicorn re-raises the signal it caught once it has shut down; the default action would skip it).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    local = None
    try:
        if fleet is not None:
            specs = load_fleet(fleet, fam)
        else:
            typer.echo(f"starting local {engine} workers for {len(fam.servable)} members ...", err=True)
            local = LocalWorkers(fam, engine, device_class, threads=worker_threads or None, dtype=dtype)
            specs = local.specs
        limits = Limits.for_context(max(m.max_model_len for m in fam.servable), max_body_bytes=max_body_bytes)
        app = create_app(fam, specs, auth=auth, live=not static, health_interval=health_interval, limits=limits,
                         state_backend=state_backend, state_failure=state_failure, tracer_provider=provider, policy=policy)
        typer.echo(f"gateway for family {fam.registry.name} on http://{host}:{port}/v1 ({len(specs)} workers; quota state: "
                   f"{state_backend.url}, fail {state_failure}; traces: {otel})", err=True)
        gc.collect()
        gc.freeze()  # start-up objects (tokenizers, registry, imports) out of the collector's way: shorter GC pauses
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        if local is not None:
            local.close()


def hash_key(
    key: str = typer.Argument(None, help="the bearer key; read from stdin when omitted (keeps it out of shell history)"),
    new: bool = typer.Option(False, "--new", help="make a new random key and print it with its hash"),
) -> None:
    """Print the sha256 a keys file stores for an API key (`sha256:` in keys.yaml)."""
    import secrets
    import sys

    from family.errors import FamilyError
    from server.keys import hash_key as digest

    if new:
        key = "sk-" + secrets.token_urlsafe(32)
        typer.echo(f"key:    {key}")
        typer.echo(f"sha256: {digest(key)}")
        return
    key = key if key is not None else sys.stdin.readline().strip()
    if len(key) < 8:
        raise FamilyError("a key has at least 8 characters")
    typer.echo(digest(key))


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
    app.command("serve")(serve)
    app.command("hash-key")(hash_key)
