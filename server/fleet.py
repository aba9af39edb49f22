"""The fleet: which workers serve which members, on which device class.

From a file (`--fleet fleet.yaml`), for workers that run elsewhere (GPU nodes with vLLM, CPU nodes):

    workers:
      - url: http://10.0.0.5:8000      # any OpenAI-compatible worker (vLLM or `family worker`)
        member: smollm2-135m-p80
        device_class: h100
        api_key: optional-bearer-token
        max_concurrent: 8              # requests the gateway sends it at once (default: the gateway's --worker-slots)
        prefix_caching: true           # it caches prompt prefixes (vLLM): affinity hits shorten predicted TTFT
        deadline_scheduling: false     # it serves requests with a latency budget first (`family worker --engine torch`)

A worker that serves several members (one `family worker` per CPU host, the torch engine's way) is
listed once per member with the same url; the gateway keeps load and speed per member of it.

Or started here: with the torch engine, one `family worker` process for every servable member (one
runtime and thread pool, the whole machine given to whichever members have work); with vLLM, one
process per member.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

from family.errors import FamilyError
from family.registry import Family


class WorkerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: HttpUrl
    member: str = Field(min_length=1)
    device_class: str = Field(min_length=1)
    api_key: str | None = None
    max_concurrent: int | None = Field(default=None, ge=1)  # gateway-side slots (server.priority); None: the gateway's default
    prefix_caching: bool = False  # vLLM's automatic prefix caching: an affinity hit skips the cached prefill (server.affinity)
    deadline_scheduling: bool = False  # serves requests with a latency budget first (`family worker --engine torch`; server.deadline_scheduling)

    @property
    def base(self) -> str:
        return str(self.url).rstrip("/")


class FleetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: list[WorkerSpec] = Field(min_length=1)


def load_fleet(path: Path, family: Family) -> list[WorkerSpec]:
    """Read and validate a fleet file against the family: every worker serves a servable member."""
    path = Path(path)
    if not path.is_file():
        raise FamilyError(f"fleet file not found: {path}")
    try:
        fleet = FleetFile.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise FamilyError(f"fleet file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FamilyError(f"fleet file {path}: {where}: {first['msg']}") from exc
    seen: set[tuple[str, str]] = set()
    for w in fleet.workers:
        if (w.base, w.member) in seen:
            raise FamilyError(f"fleet file {path}: worker {w.base} is listed twice for member {w.member!r}")
        seen.add((w.base, w.member))
        if w.member not in family.registry.names():
            raise FamilyError(f"fleet file {path}: worker {w.base} serves unknown member {w.member!r} (members: {', '.join(family.registry.names())})")
        if w.member in family.problems:
            raise FamilyError(f"fleet file {path}: member {w.member!r} is not servable: {family.problems[w.member]}")
    return fleet.workers


class LocalWorkers:
    """The workers for every servable member on this machine, stopped on close.

    Torch: one `family worker` process serving them all, with all of torch's threads (one per core):
    one runtime, one thread pool, and a scheduler that gives the machine to whichever members have
    work (server.engine_torch). It replaced one process per member pinned to cores/N threads each,
    which left cores idle whenever a member had nothing to do and paid the runtime N times.
    vLLM: one process per member (vLLM serves one model per process). `threads` caps the torch
    worker's threads (default: torch's, one per core); `dtype` the workers' serving dtype.
    """

    def __init__(self, family: Family, engine: str, device_class: str, log_dir: Path | None = None, threads: int | None = None,
                 dtype: str = "float32"):
        from family.profile import WorkerProcess, worker_groups, worker_log_name

        self.processes = []
        self.specs: list[WorkerSpec] = []
        log_dir = Path(log_dir or family.root / "logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for group in worker_groups([m.name for m in family.servable], engine):  # start them all, then wait: start-ups overlap
                proc = WorkerProcess([family.member_dir(n) for n in group], group, engine, log=log_dir / worker_log_name(group, engine),
                                     ready_timeout=None, threads=threads if engine == "torch" else None, dtype=dtype)
                self.processes.append(proc)
                # vLLM caches prompt prefixes (server.affinity counts a hit in its TTFT); the torch engine does not,
                # and serves requests with a latency budget first (server.deadline_scheduling)
                self.specs += [WorkerSpec(url=proc.url, member=n, device_class=device_class, prefix_caching=engine == "vllm",
                                          deadline_scheduling=engine == "torch") for n in group]
            for proc in self.processes:
                proc.wait_ready()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for p in self.processes:
            p.stop()
