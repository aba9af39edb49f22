"""The family registry: `family.json` at the root of a family folder.

It is the one source of truth the gateway routes from: for every member its size, ranks, provenance,
the sha256 of every weight file, and what was *measured* about it (accuracy records, latency profiles
per device class). Written atomically; on load every member's files are checked (fast: size and
mtime; full: sha256) and a member that fails is reported by name and never offered for serving.

What the gateway and the tools code against:
- `load_family(root, verify=...) -> Family` (`.registry`, `.problems`, `.servable`, `.member_dir(name)`),
  `read_registry`, `save_registry`, `sync_family`, `member_name`, `parent_name`;
- `MemberRecord.quality_at(dtype)` (chat agreement with the float32 parent, measured at the dtype the
  member is served at, `.serving_dtype(device_class)`; the float32 parent is 1.0), `.metric("perplexity")`,
  `rank_key(record, dtype)` (best first),
  `memory_bytes(record, device_class, dtype)` (weights + KV cache: the member's own need),
  `MemberRecord.profile(device_class, devices)` (measured, else `basis: predicted` from the device's
  bandwidth, family/devices.py); what fits a budget is family/fit.py (`members_fitting`);
- device classes: `FamilyRegistry.devices` (measured bandwidth), `Family.record_device(DeviceRecord)`;
- fitness: `FamilyRegistry.fitness` (a `FitnessPolicy`), `MemberRecord.unfit_reason(policy)`,
  `Family.unfit` (servable members kept from routed traffic, with why), `Family.set_fitness(policy)`;
- `family.latency.predict_latency(record, device_class, prompt_tokens, output_tokens, concurrency, devices)`;
- `Family.record(name, accuracy=..., latency=...)`: add measurements under a lock, merged with what
  other processes saved meanwhile (`sync_family` takes the same lock).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from family import defaults
from family.errors import FamilyError
from family.storage import atomic_write_text, sha256_file

SCHEMA_VERSION = 1
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the serving dtypes figures are recorded at
WEIGHT_SUFFIXES = (".safetensors",)
Verify = Literal["none", "fast", "full"]


def check_dtype(dtype: str) -> str:
    """`dtype` when figures can be recorded at it (DTYPE_BYTES); else a FamilyError for `--dtype`."""
    if dtype not in DTYPE_BYTES:
        *rest, last = DTYPE_BYTES
        raise FamilyError(f"--dtype must be {', '.join(rest)} or {last}, got {dtype!r}")
    return dtype


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileRecord(_Model):
    """One weight file of a member: what it must hash to, and cheap fingerprints for fast checks."""

    sha256: str
    size: int
    mtime_ns: int


class AccuracyRecord(_Model):
    """One measured accuracy figure, with enough context to reproduce it."""

    # "chat_agreement", "chat_kl", "degenerate_answers", "degenerate_beyond_parent" (held-out chat prompts), "perplexity",
    # "top1_agreement", "mean_kl" (held-out plain text), "lm_eval:<task>", ...
    metric: str
    value: float
    data: str  # file path or dataset name
    data_sha256: str | None = None
    tokens: int | None = None  # tokens scored; for "degenerate_answers", the number of prompts
    reference: str | None = None  # the member compared against (agreement, KL)
    # the dtype the member ran at (`family eval --dtype`); the parent it is compared with runs at float32
    dtype: str = "float32"
    command: str = ""
    measured_at: str = Field(default_factory=now_iso)


class LatencySample(_Model):
    """One measured request shape: time to first token, time per output token, throughput."""

    prompt_tokens: int
    output_tokens: int
    concurrency: int
    ttft_s: float
    tpot_s: float
    e2e_s: float
    throughput_tok_s: float


class DeviceRecord(_Model):
    """What bounds a device class: its memory bandwidth (decode reads every weight once per step) and its
    dense matmul rate (prefill), measured on the machine (`family profile`, benchmarks/bandwidth.py) or
    published by its maker (family/devices.py, with the datasheet in `source`)."""

    device_class: str
    bandwidth_bytes_s: float = Field(gt=0)
    matmul_flops: float | None = Field(default=None, gt=0)  # dense matmul, at `dtype`
    dtype: str = "float32"  # the serving dtype these figures are for
    basis: Literal["measured", "published"] = "measured"
    buffer_bytes: int | None = None  # measured: bytes read per pass (the parent's weights)
    repeats: int | None = None  # measured: best of this many passes
    kernel: str | None = None  # measured: the read that reached it (family/bandwidth.py)
    threads: int | None = None  # measured: torch threads
    source: str = ""  # the command that measured it, or the datasheet
    measured_at: str = Field(default_factory=now_iso)


class MemoryBreakdown(_Model):
    """A member's serving memory on one device class, in parts, and which figure is which.

    `member_bytes` (weights + KV cache) is the member's own need: what `max_memory_gb` compares. The
    runtime (interpreter, torch, thread pools: most of a small worker's RSS) is the same for every
    member and, where one engine process serves several members, paid once per host; it is recorded
    apart with the number of members sharing it, and `serving_bytes` adds that share.
    """

    basis: Literal["measured", "predicted"] = "measured"
    dtype: str  # serving dtype of the weights (and of the KV cache, unless kv_dtype says otherwise)
    kv_dtype: str | None = None  # the KV cache's, where it differs (the torch engine caches float32)
    weights_bytes: int  # the loaded model's tensors (unique storages: tied embeddings once)
    kv_bytes_per_token: int  # keys + values of every layer for one token
    kv_batch: int  # rows the worker decodes together
    kv_context: int  # tokens of context per row
    runtime_bytes: int | None = None  # RSS of the engine's runtime with no model loaded
    runtime_shared_by: int = Field(default=1, ge=1)  # members served by one runtime on this host
    worker_peak_rss_bytes: int | None = None  # the whole worker process tree while profiled, with every member it serves (reference only)

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_bytes_per_token * self.kv_batch * self.kv_context

    @property
    def member_bytes(self) -> int:
        """Weights + KV cache: what this member adds to a host, and what `max_memory_gb` selects by."""
        return self.weights_bytes + self.kv_cache_bytes

    @property
    def runtime_share_bytes(self) -> int:
        return (self.runtime_bytes or 0) // self.runtime_shared_by

    @property
    def serving_bytes(self) -> int:
        """The member's need plus its share of the runtime."""
        return self.member_bytes + self.runtime_share_bytes


class PredictionBasis(_Model):
    """How a predicted profile was made: from which device figures, at which stated efficiencies."""

    device: DeviceRecord
    bandwidth_efficiency: float
    compute_efficiency: float
    weight_bytes: int  # read once per decode step
    kv_bytes_per_token: int
    flops_per_token: float  # prefill: 2 × parameters


class LatencyProfile(_Model):
    """Everything measured about one member on one device class, through the engine that serves it; or,
    where nobody has profiled it yet, predicted from the device's bandwidth (`basis: predicted`)."""

    device_class: str
    engine: str  # "vllm" | "torch" | "predicted"
    basis: Literal["measured", "predicted"] = "measured"
    dtype: str = "float32"
    threads: int | None = None  # torch engine: CPU threads of the worker (None: the engine's default)
    # torch engine: how the worker served the member while it was measured: its dtype and, per projection
    # shape, dense or factor pair (and at what rank), chosen by timing each form at load (server.layout)
    serving: dict | None = None
    samples: list[LatencySample] = Field(default_factory=list)
    peak_memory_bytes: int | None = None  # the worker process tree's peak RSS, every member it serves loaded (not routed on)
    memory: MemoryBreakdown | None = None  # the member's serving memory, in parts
    prediction: PredictionBasis | None = None  # basis "predicted": what it was predicted from
    latency_model: dict[str, float] | None = None  # coefficients fitted by family.latency
    fit_error: dict[str, float] | None = None  # the model's mean relative error on these samples (ttft, tpot, e2e)
    command: str = ""
    measured_at: str = Field(default_factory=now_iso)


def _percent(share: float) -> str:
    """0.125 → "12%", but 0.003 → "0.3%": a small nonzero share must not read as 0%."""
    return f"{share:.1%}" if 0 < share < 0.01 else f"{share:.0%}"


class FitnessPolicy(_Model):
    """When a member is unfit for routed traffic, whatever the caller's budget (issue 10).

    Per family, in family.json: a member that answers chat prompts with blank lines or `<unk>` can still
    score well on plain-text perplexity, and a caller's `min_accuracy` is a preference, not a guard.
    """

    min_chat_agreement: float = Field(default=defaults.MIN_CHAT_AGREEMENT, ge=0.0, le=1.0)
    max_degenerate: float = Field(default=0.0, ge=0.0, le=1.0)  # share of held-out chat prompts


class MemberRecord(_Model):
    name: str
    path: str  # relative to the family folder
    architecture: str
    is_parent: bool = False
    derived_from: str | None = None  # the member it was cut from (None for the parent)
    ranks: dict[str, int] = Field(default_factory=dict)
    vocab_size: int | None = None  # tokens it can say: below the parent's when its vocabulary is trimmed (plrd/vocab.py)
    parameters: int
    bytes: dict[str, int]  # weight bytes at each serving dtype
    max_model_len: int = defaults.MAX_MODEL_LEN
    kv_values_per_token: int | None = None  # 2 × layers × KV heads × head dim (from config.json)
    files: dict[str, FileRecord]
    provenance: dict = Field(default_factory=dict)
    accuracy: list[AccuracyRecord] = Field(default_factory=list)
    latency: dict[str, LatencyProfile] = Field(default_factory=dict)  # by device class

    def metric(self, metric: str, dtype: str = "float32") -> float | None:
        """The newest record of `metric` measured at `dtype`, or None."""
        found = self.latest(metric, dtype)
        return found.value if found else None

    def latest(self, metric: str, dtype: str = "float32") -> AccuracyRecord | None:
        """The newest whole record of `metric` at `dtype` (its data, tokens, reference), or None."""
        found = [r for r in self.accuracy if r.metric == metric and r.dtype == dtype]
        return found[-1] if found else None

    @property
    def quality(self) -> float | None:
        """The routing accuracy score in [0, 1] at float32 (see `quality_at`)."""
        return self.quality_at("float32")

    def quality_at(self, dtype: str) -> float | None:
        """The routing accuracy score in [0, 1] when served at `dtype`: chat agreement, the teacher-forced
        top-1 agreement with the float32 parent's greedy answers on held-out chat prompts (the parent at
        float32 is 1.0 by definition; at bfloat16 it is what `family eval --dtype bfloat16` measured).
        None until measured at that dtype: neither plain-text top1_agreement nor another dtype's figure
        stands in, so that `min_accuracy` has one meaning."""
        return 1.0 if self.is_parent and dtype == "float32" else self.metric("chat_agreement", dtype)

    def serving_dtype(self, device_class: str, devices: dict[str, DeviceRecord] | None = None) -> str:
        """The dtype this member is served at on `device_class`: its profile's there (measured, or
        predicted from the device's table), else float32."""
        profile = self.profile(device_class, devices)
        return profile.dtype if profile is not None else "float32"

    def unfit_reason(self, policy: FitnessPolicy, dtype: str = "float32") -> str | None:
        """Why routed traffic must not reach this member under `policy` when served at `dtype`, or None.

        Judged on the figures measured at `dtype`, else on float32's: the cut decides fitness far more
        than rounding does, and a member that loops at float32 must not become routable on a worker
        whose dtype nobody evaluated. The float32 parent is never unfit (it is what the others are
        measured against); a member not measured yet is not unfit either (it then fits only budgets
        without `min_accuracy`). ASCII only: the reason travels in the `x-family-warning` header.
        """
        if self.is_parent and dtype == "float32":
            return None
        if self.latest("chat_agreement", dtype) is None:
            if self.is_parent:
                return None
            dtype = "float32"
        reasons = []
        # Degenerate answers the member adds to the parent's own (where `family eval` recorded which):
        # a member that loops, word for word, exactly where the parent loops is the parent's model there.
        beyond = self.latest("degenerate_beyond_parent", dtype)
        degenerate = beyond if beyond is not None else self.latest("degenerate_answers", dtype)
        at = "" if dtype == "float32" else f" at {dtype}"
        if degenerate is not None and degenerate.value > policy.max_degenerate:
            of = f" of {degenerate.tokens} prompts" if degenerate.tokens else ""
            where = " where the parent's are not" if beyond is not None else ""
            reasons.append(f"{_percent(degenerate.value)} degenerate chat answers{where}{of}{at} (max {_percent(policy.max_degenerate)})")
        agreement = self.metric("chat_agreement", dtype)
        if agreement is not None and agreement < policy.min_chat_agreement:
            reasons.append(f"chat agreement {agreement:.3f}{at} < {policy.min_chat_agreement:g}")
        return "; ".join(reasons) or None

    def profile(self, device_class: str, devices: dict[str, DeviceRecord] | None = None) -> LatencyProfile | None:
        """The profile the router uses on `device_class`: the measured one when `family profile` ran there,
        else one predicted from the device's bandwidth (`devices`: the registry's measured device
        records; else the published table of family/devices.py), else None (an unknown device)."""
        measured = self.latency.get(device_class)
        if measured is not None:
            return measured
        from family.devices import predict_profile

        return predict_profile(self, device_class, devices)

    def weight_bytes(self, dtype: str = "float32") -> int:
        if dtype not in self.bytes and dtype in DTYPE_BYTES:
            return self.parameters * DTYPE_BYTES[dtype]
        return self.bytes.get(dtype, self.bytes["float32"])

    def memory_bytes(self, device_class: str | None = None, dtype: str = "float32",
                     devices: dict[str, DeviceRecord] | None = None) -> int:
        """The member's own serving need on `device_class` (weights + KV cache, `MemoryBreakdown.member_bytes`):
        measured by `family profile`, else predicted for a known device class; else (an older profile
        without a breakdown, or no device class) its weights' bytes at the profile's dtype or `dtype`.
        Never the worker's whole RSS, which is mostly the runtime every member shares."""
        profile = self.profile(device_class, devices) if device_class else None
        if profile is not None and profile.memory is not None:
            return profile.memory.member_bytes
        return self.weight_bytes(profile.dtype if profile is not None else dtype)


class FamilyRegistry(_Model):
    schema_version: int = SCHEMA_VERSION
    name: str
    parent: str  # name of the parent member
    members: list[MemberRecord] = Field(default_factory=list)
    fitness: FitnessPolicy = Field(default_factory=FitnessPolicy)  # absent in older files: the defaults
    devices: dict[str, DeviceRecord] = Field(default_factory=dict)  # measured device classes (bandwidth)
    created_at: str = Field(default_factory=now_iso)
    updated_at: str = Field(default_factory=now_iso)

    def member(self, name: str) -> MemberRecord:
        for m in self.members:
            if m.name == name:
                return m
        raise FamilyError(f"no member named {name!r} in family {self.name!r} (members: {', '.join(self.names())})")

    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def upsert(self, record: MemberRecord) -> None:
        self.members = [m for m in self.members if m.name != record.name] + [record]
        self.members.sort(key=lambda m: (not m.is_parent, -m.parameters))


class Family:
    """A registry loaded from a folder, with the members that passed verification."""

    def __init__(self, root: Path, registry: FamilyRegistry, problems: dict[str, str]):
        self.root = Path(root)
        self.registry = registry
        self.problems = problems  # member name → why it is not servable

    @property
    def servable(self) -> list[MemberRecord]:
        return [m for m in self.registry.members if m.name not in self.problems]

    @property
    def unfit(self) -> dict[str, str]:
        """Servable members that routed traffic never reaches at float32 (they answer when pinned), with why."""
        return self.unfit_at("float32")

    def unfit_at(self, dtype: str) -> dict[str, str]:
        """The same for members served at `dtype` (judged on the figures measured there, else float32's)."""
        policy = self.registry.fitness
        return {m.name: why for m in self.servable if (why := m.unfit_reason(policy, dtype))}

    def member_dir(self, name: str) -> Path:
        return self.root / self.registry.member(name).path

    def save(self) -> None:
        """Write the whole in-memory registry (last writer wins; see `record` for concurrent writers)."""
        save_registry(self.root, self.registry)

    def record(self, name: str, *, accuracy: list[AccuracyRecord] = (), latency: LatencyProfile | None = None) -> None:
        """Add measurements of one member and save, without losing what another process saved meanwhile.

        Under an exclusive lock on `family.json.lock`, the registry is re-read from disk, the new
        records are added to `name`, and it is written back atomically; the in-memory registry is
        replaced by the merged one. Two `family eval`/`family profile` runs on one family can run at once.
        """
        with registry_lock(self.root):
            fresh = read_registry(self.root)
            rec = fresh.member(name)
            rec.accuracy.extend(a.model_copy() for a in accuracy)
            if latency is not None:
                rec.latency[latency.device_class] = latency.model_copy(deep=True)
            # Keep file fingerprints refreshed by this process's fast verification.
            for m in fresh.members:
                if m.name in self.registry.names():
                    mine = self.registry.member(m.name)
                    for fname, f in m.files.items():
                        if fname in mine.files and mine.files[fname].sha256 == f.sha256:
                            f.mtime_ns = mine.files[fname].mtime_ns
            save_registry(self.root, fresh)
            self.registry = fresh

    def record_device(self, device: DeviceRecord) -> None:
        """Store a device class's measured bandwidth (and matmul rate), merged under the registry lock."""
        with registry_lock(self.root):
            fresh = read_registry(self.root)
            fresh.devices[device.device_class] = device.model_copy(deep=True)
            save_registry(self.root, fresh)
            self.registry = fresh

    def set_fitness(self, policy: FitnessPolicy) -> None:
        """Store the family's fitness policy, merged under the same lock as `record` (measurements that
        another process saved meanwhile are kept); the in-memory registry becomes the merged one.
        A running gateway reads it at start-up."""
        with registry_lock(self.root):
            fresh = read_registry(self.root)
            fresh.fitness = policy.model_copy()
            save_registry(self.root, fresh)
            self.registry = fresh


# --- reading members from disk -------------------------------------------------------------------


def _weight_files(member_dir: Path) -> list[Path]:
    return sorted(p for p in member_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _count_parameters(member_dir: Path) -> int:
    """Parameters stored in the member's safetensors files (tied embeddings are stored, and counted, once)."""
    from safetensors import safe_open

    total = 0
    for f in _weight_files(member_dir):
        with safe_open(f, framework="pt") as sf:
            for key in sf.keys():
                n = 1
                for d in sf.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def kv_values_per_token(config: dict) -> int | None:
    """Keys and values cached per token, all layers: 2 × layers × KV heads × head dim (Llama configs)."""
    try:
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        return 2 * int(config["num_hidden_layers"]) * int(config.get("num_key_value_heads") or heads) * head_dim
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def describe_member(family_root: Path, member_dir: Path, *, name: str, is_parent: bool = False) -> MemberRecord:
    """Measure a member folder: parameters, bytes per dtype, ranks, checksums, provenance."""
    member_dir = Path(member_dir)
    config_path = member_dir / "config.json"
    if not config_path.is_file():
        raise FamilyError(f"member {name!r}: no config.json in {member_dir}")
    config = json.loads(config_path.read_text())
    files = _weight_files(member_dir)
    if not files:
        raise FamilyError(f"member {name!r}: no .safetensors weight file in {member_dir}")
    provenance_path = member_dir / "provenance.json"
    provenance = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    params = _count_parameters(member_dir)
    root, resolved = Path(family_root).resolve(), member_dir.resolve()
    # Inside the family folder: a relative path, so the folder can move; elsewhere (a parent kept
    # outside the family): absolute.
    rel = str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)
    return MemberRecord(
        name=name,
        path=rel,
        architecture=(config.get("architectures") or ["?"])[0],
        is_parent=is_parent,
        derived_from=provenance.get("derived_from"),
        ranks={k: int(v) for k, v in (config.get("ranks") or {}).items()},
        parameters=params,
        bytes={dtype: params * size for dtype, size in DTYPE_BYTES.items()},
        max_model_len=min(int(config.get("max_position_embeddings", defaults.MAX_MODEL_LEN)), defaults.MAX_MODEL_LEN),
        kv_values_per_token=kv_values_per_token(config),
        vocab_size=config.get("vocab_size"),
        files={
            f.name: FileRecord(sha256=sha256_file(f), size=f.stat().st_size, mtime_ns=f.stat().st_mtime_ns)
            for f in files
        },
        provenance=provenance,
    )


def verify_member(family_root: Path, record: MemberRecord, mode: Verify = "fast") -> str | None:
    """Why this member must not be served (missing or changed files), or None when it checks out."""
    if mode == "none":
        return None
    member_dir = Path(family_root) / record.path
    if not member_dir.is_dir():
        return f"member folder missing: {member_dir}"
    for fname, expect in record.files.items():
        path = member_dir / fname
        if not path.is_file():
            return f"weight file missing: {path}"
        st = path.stat()
        if st.st_size != expect.size:
            return f"weight file changed size: {path} ({st.st_size} bytes, registry says {expect.size})"
        if mode == "full" or st.st_mtime_ns != expect.mtime_ns:
            if sha256_file(path) != expect.sha256:
                return f"checksum mismatch: {path}"
            # Same content, new mtime (copied, touched): remember the new fingerprint so the next fast
            # check is cheap again; it reaches disk with the next save of the registry.
            expect.mtime_ns = st.st_mtime_ns
    return None


# --- family.json ---------------------------------------------------------------------------------


def registry_path(family_root: Path) -> Path:
    return Path(family_root) / defaults.REGISTRY_FILE


@contextlib.contextmanager
def registry_lock(family_root: Path):
    """An exclusive advisory lock (flock) on FAMILY/family.json.lock, for read-modify-write updates."""
    lock_path = Path(family_root) / (defaults.REGISTRY_FILE + ".lock")
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def save_registry(family_root: Path, registry: FamilyRegistry) -> None:
    registry.updated_at = now_iso()
    atomic_write_text(registry_path(family_root), registry.model_dump_json(indent=2) + "\n")


def read_registry(family_root: Path) -> FamilyRegistry:
    path = registry_path(family_root)
    if not path.is_file():
        raise FamilyError(f"no registry at {path} (build a family with `family build` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FamilyError(f"registry {path} is not valid JSON: {exc}") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise FamilyError(f"registry {path} has schema_version {version!r}; this version reads {SCHEMA_VERSION}")
    try:
        return FamilyRegistry.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FamilyError(f"registry {path} is invalid at {where}: {first['msg']}") from exc


def load_family(family_root: Path, verify: Verify = "fast") -> Family:
    """Read family.json and verify every member; failing members are listed in `problems`."""
    registry = read_registry(family_root)
    problems = {}
    for m in registry.members:
        why = verify_member(family_root, m, verify)
        if why:
            problems[m.name] = why
    return Family(Path(family_root), registry, problems)


def parent_name(family_name: str) -> str:
    """The parent is served as a member too, named like one that keeps 100% of the parameters."""
    return f"{family_name}-p100"


def member_name(family_name: str, fraction: float) -> str:
    """Member names say the share of the parent's parameters they keep: smollm2-135m-p80."""
    return f"{family_name}-p{round(fraction * 100):d}"


def sync_family(family_root: Path, *, parent_dir: Path, family_name: str | None = None) -> FamilyRegistry:
    """Create or update family.json from what is on disk: the parent and every member folder.

    A member folder is a subfolder of `family_root` holding config.json and provenance.json. Records of
    members already registered keep their accuracy and latency measurements when their weights are
    unchanged (same checksums); a rebuilt member starts with no measurements.
    """
    family_root = Path(family_root)
    parent_dir = Path(parent_dir)
    if not (parent_dir / "config.json").is_file():
        raise FamilyError(f"parent folder has no config.json: {parent_dir}")
    family_root.mkdir(parents=True, exist_ok=True)
    with registry_lock(family_root):  # against a concurrent eval/profile recording into the same file
        return _sync_locked(family_root, parent_dir, family_name)


def _sync_locked(family_root: Path, parent_dir: Path, family_name: str | None) -> FamilyRegistry:
    try:
        registry = read_registry(family_root)
    except FamilyError:
        if registry_path(family_root).exists():
            raise
        name = family_name or defaults.FAMILY_NAME
        registry = FamilyRegistry(name=name, parent=parent_name(name))
    found = [(parent_name(registry.name), parent_dir, True)]
    for sub in sorted(family_root.iterdir()):
        if sub.resolve() == parent_dir.resolve():
            continue
        if sub.is_dir() and (sub / "config.json").is_file() and (sub / "provenance.json").is_file():
            found.append((sub.name, sub, False))
    registry.parent = parent_name(registry.name)
    for name, path, is_parent in found:
        fresh = describe_member(family_root, path, name=name, is_parent=is_parent)
        if name in registry.names():
            old = registry.member(name)
            if {k: f.sha256 for k, f in old.files.items()} == {k: f.sha256 for k, f in fresh.files.items()}:
                fresh.accuracy, fresh.latency = old.accuracy, old.latency
        registry.upsert(fresh)
    save_registry(family_root, registry)
    return registry


# --- what the gateway asks of the registry ---------------------------------------------------------


def memory_bytes(record: MemberRecord, device_class: str | None = None, dtype: str = "float32",
                 devices: dict[str, DeviceRecord] | None = None) -> int:
    """Memory a member needs on `device_class`: weights + KV cache, measured there or predicted for a
    known device class, else its weights' bytes at `dtype` (see `MemberRecord.memory_bytes`)."""
    return record.memory_bytes(device_class, dtype, devices)


def rank_key(m: MemberRecord, dtype: str = "float32") -> tuple:
    """Best first: higher quality at `dtype` (unmeasured last), then lower perplexity, then fewer parameters."""
    q = m.quality_at(dtype)
    ppl = m.metric("perplexity", dtype)
    if ppl is None:
        ppl = m.metric("perplexity")
    return (-(q if q is not None else -1.0), ppl if ppl is not None else float("inf"), m.parameters)
