"""Budget classes, request shapes, the three routing policies and the goodput judgement.

Nothing here imports locust or gevent, so the reliability scenarios and the report can use it too.

Budget classes are derived from the family's own registry figures (memory, accuracy, the fitted
latency model on the fleet's device class), so the same scenario means the same thing on a tiny test
family and on SmolLM2-135M:

- ``tight_latency``: interactive chat, always streamed; a TTFT and a total-latency limit a multiple
  (``latency_slack``) of what the *fastest* member is predicted to need at a light load.
- ``tight_memory``: a memory limit between the largest and the second-largest member, so the parent
  never fits.
- ``high_accuracy``: an accuracy floor that only the two most accurate members meet, with a loose
  total-latency limit (``accuracy_latency_slack`` times the parent's prediction at a light load).
- ``none``: no budget at all.

A request *met its budget* when it succeeded (HTTP 200; a stream ended with ``[DONE]`` and no error
event), its observed TTFT ≤ ``max_ttft_ms`` (a non-streamed response's first token arrives with the
whole body, so its TTFT is its total time), its total time ≤ ``max_latency_ms``, its time per output
token after the first ≤ ``max_tpot_ms`` (a non-streamed response shows no token times, so its whole time
over its tokens stands in: an upper bound), and the member that served it (``x-family-member``) fits
``max_memory_gb`` and ``min_accuracy`` by the registry's figures.
Rejected (``budget_error``), overloaded (429) and failed requests did not meet it.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from family import defaults
from family.latency import predict_latency
from family.registry import FamilyRegistry, MemberRecord, rank_key

POLICIES = ("gateway", "parent", "static")
CLASS_NAMES = ("tight_latency", "tight_memory", "high_accuracy", "none")
WORDS_TO_TOKENS = 1.35  # WikiText words → SmolLM2/tiny-BPE tokens, roughly; the gateway counts exactly


@dataclass
class ClassSpec:
    """One budget class: its budget, its share of users and the shape of its requests."""

    name: str
    budget: dict
    weight: int
    stream_share: float  # probability that a request streams
    chat_share: float  # probability that a request is a chat completion (else a text completion)
    prompt_words: tuple[int, int]
    max_tokens: tuple[int, int]

    def approx_prompt_tokens(self) -> int:
        return int(self.prompt_words[1] * WORDS_TO_TOKENS) + 16


@dataclass
class Figures:
    """What the client knows about the family: /v1/family (or family.json) and the fleet's device class."""

    registry: FamilyRegistry
    device_class: str

    @classmethod
    def from_family_json(cls, data: dict, device_class: str | None = None) -> "Figures":
        workers = data.get("workers") or []
        reg = FamilyRegistry.model_validate({k: v for k, v in data.items() if k not in ("problems", "unfit", "workers")})
        problems = data.get("problems") or {}
        if problems:
            reg.members = [m for m in reg.members if m.name not in problems]
        if device_class is None:
            classes = [w["device_class"] for w in workers if w.get("device_class")]
            device_class = classes[0] if classes else "cpu-2core"
        return cls(reg, device_class)

    @classmethod
    def from_gateway(cls, gateway: str, device_class: str | None = None, api_key: str | None = None) -> "Figures":
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        r = httpx.get(f"{gateway.rstrip('/')}/v1/family", headers=headers, timeout=30)
        r.raise_for_status()
        return cls.from_family_json(r.json(), device_class)

    @classmethod
    def from_dir(cls, family_dir: Path, device_class: str) -> "Figures":
        return cls.from_family_json(json.loads((Path(family_dir) / defaults.REGISTRY_FILE).read_text()), device_class)

    @property
    def family(self) -> str:
        return self.registry.name

    @property
    def parent(self) -> str:
        return self.registry.parent

    def member(self, name: str) -> MemberRecord | None:
        return next((m for m in self.registry.members if m.name == name), None)

    def memory_gb(self, m: MemberRecord) -> float:
        return m.memory_bytes(self.device_class) / 1e9

    def dtype(self, m: MemberRecord) -> str:
        """The dtype `m` is served at on this device class: its accuracy and fitness are those there."""
        return m.serving_dtype(self.device_class, self.registry.devices)

    def quality(self, m: MemberRecord) -> float | None:
        return m.quality_at(self.dtype(m))

    def unfit(self, m: MemberRecord) -> str | None:
        return m.unfit_reason(self.registry.fitness, self.dtype(m))

    def predict(self, m: MemberRecord, prompt_tokens: int, max_tokens: int, concurrency: float = 1):
        return predict_latency(m, self.device_class, prompt_tokens, max_tokens, concurrency)


def derive_classes(fig: Figures, *, latency_slack: float = 2.0, accuracy_latency_slack: float = 4.0,
                   ref_concurrency: float = 2.0) -> list[ClassSpec]:
    """The four budget classes, with limits derived from the registry's figures (see module doc), of the
    members routed traffic can reach: a limit only an unfit member could meet is one no policy can serve."""
    members = [m for m in fig.registry.members if fig.unfit(m) is None]
    tl = ClassSpec("tight_latency", {}, 3, 1.0, 1.0, (20, 80), (16, 32))
    tm = ClassSpec("tight_memory", {}, 2, 0.5, 0.5, (40, 160), (24, 48))
    ha = ClassSpec("high_accuracy", {}, 2, 0.5, 0.5, (60, 200), (24, 48))
    no = ClassSpec("none", {}, 2, 0.5, 0.5, (20, 200), (16, 48))

    preds = {m.name: fig.predict(m, tl.approx_prompt_tokens(), tl.max_tokens[1], ref_concurrency) for m in members}
    known = {k: v for k, v in preds.items() if v is not None}
    if known:
        fastest = min(known.values(), key=lambda p: p.e2e_s)
        tl.budget = {"max_ttft_ms": float(f"{latency_slack * fastest.ttft_s * 1e3:.4g}"),
                     "max_latency_ms": float(f"{latency_slack * fastest.e2e_s * 1e3:.4g}")}
    mems = sorted({fig.memory_gb(m) for m in members}, reverse=True)
    if len(mems) >= 2:
        tm.budget = {"max_memory_gb": float(f"{(mems[0] + mems[1]) / 2:.4g}")}
    quals = sorted({q for m in members if (q := fig.quality(m)) is not None}, reverse=True)
    if len(quals) >= 2:
        ha.budget = {"min_accuracy": float(f"{quals[1] - 1e-4:.6g}")}
    parent = fig.member(fig.parent)
    if parent is not None:
        pp = fig.predict(parent, ha.approx_prompt_tokens(), ha.max_tokens[1], ref_concurrency)
        if pp is not None:
            ha.budget["max_latency_ms"] = float(f"{accuracy_latency_slack * pp.e2e_s * 1e3:.4g}")
    return [tl, tm, ha, no]


def load_classes(path: Path) -> list[ClassSpec]:
    """Budget classes from a JSON list of ClassSpec fields (overrides the derived ones)."""
    return [ClassSpec(**{**c, "prompt_words": tuple(c["prompt_words"]), "max_tokens": tuple(c["max_tokens"])})
            for c in json.loads(Path(path).read_text())]


def classes_json(classes: list[ClassSpec]) -> list[dict]:
    return [asdict(c) for c in classes]


# --- prompts ----------------------------------------------------------------------------------------


class Prompts:
    """Slices of held-out WikiText-2 (test split), as many words as asked."""

    def __init__(self, path: Path = defaults.EVAL_TEXT, seed: int = 0):
        text = Path(path).read_text(encoding="utf-8") if Path(path).is_file() else ""
        self.words = [w for w in text.split() if w not in ("=", "@-@", "@,@", "@.@")] or ("the quick brown fox " * 500).split()
        self.rng = random.Random(seed)

    def take(self, n: int, rng: random.Random | None = None) -> str:
        rng = rng or self.rng
        start = rng.randrange(0, max(1, len(self.words) - n))
        return " ".join(self.words[start : start + n])


@dataclass
class PlannedRequest:
    """One request as the client plans it: its class, budget, shape, and the model it names."""

    cls: str
    budget: dict
    chat: bool
    stream: bool
    prompt: str
    max_tokens: int
    model: str
    send_budget: bool

    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def body(self) -> dict:
        b: dict = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0.7, "stream": self.stream,
                   "ignore_eos": True}
        if self.stream:
            b["stream_options"] = {"include_usage": True}
        if self.chat:
            b["messages"] = [{"role": "user", "content": f"Continue this text: {self.prompt}"}]
        else:
            b["prompt"] = self.prompt
        if self.send_budget and self.budget:
            b["budget"] = self.budget
        return b


def plan(spec: ClassSpec, policy: str, fig: Figures, prompts: Prompts, rng: random.Random) -> PlannedRequest:
    """Draw a request of class `spec` and name its model by `policy`:
    gateway → the family (routed by budget, sent in the body); parent → the parent member, no budget;
    static → the member the registry's figures pick for this budget, no budget."""
    words = rng.randint(*spec.prompt_words)
    max_tokens = rng.randint(*spec.max_tokens)
    req = PlannedRequest(spec.name, dict(spec.budget), rng.random() < spec.chat_share, rng.random() < spec.stream_share,
                         prompts.take(words, rng), max_tokens, fig.family, True)
    if policy == "parent":
        req.model, req.send_budget = fig.parent, False
    elif policy == "static":
        req.model, req.send_budget = static_choice(fig, spec.budget, int(words * WORDS_TO_TOKENS) + 16, max_tokens), False
    elif policy != "gateway":
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return req


def static_choice(fig: Figures, budget: dict, prompt_tokens: int, max_tokens: int) -> str:
    """The static-table baseline: the most accurate member whose *registry* figures fit the budget at a
    load of one request (no live load, no observations); if none fits, the one predicted fastest.
    Never an unfit member (the gateway never routes to one either)."""
    fits, fallback = [], []
    for m in fig.registry.members:
        if fig.unfit(m):
            continue
        pred = fig.predict(m, prompt_tokens, max_tokens, 1)
        fallback.append((pred.e2e_s if pred else float("inf"), m.name))
        if "max_memory_gb" in budget and fig.memory_gb(m) > budget["max_memory_gb"]:
            continue
        if "min_accuracy" in budget and ((q := fig.quality(m)) is None or q < budget["min_accuracy"]):
            continue
        if "max_ttft_ms" in budget and (pred is None or pred.ttft_s * 1e3 > budget["max_ttft_ms"]):
            continue
        if "max_latency_ms" in budget and (pred is None or pred.e2e_s * 1e3 > budget["max_latency_ms"]):
            continue
        fits.append(m)
    if fits:
        return min(fits, key=lambda m: rank_key(m, fig.dtype(m))).name
    return min(fallback)[1]


# --- outcomes ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one request did, as the client saw it."""

    policy: str
    cls: str
    budget: dict
    model: str
    chat: bool
    stream: bool
    max_tokens: int
    start: float  # seconds since the scenario started
    status: int  # HTTP status (0: no response)
    e2e_ms: float
    ttft_ms: float | None = None  # first content token (streamed only)
    tpot_ms: float | None = None  # per output token after the first (streamed only)
    tokens: int = 0
    prompt_tokens: int | None = None
    member: str | None = None  # x-family-member
    worker: str | None = None  # x-family-worker
    predicted_latency_ms: float | None = None
    error_type: str | None = None  # OpenAI error type, "stream_error", "timeout", "connection", ...
    done: bool = False  # a stream ended with [DONE]
    met: bool = False
    missed: list[str] = field(default_factory=list)


def judge(o: Outcome, fig: Figures) -> Outcome:
    """Set `met` and `missed` (which parts of the budget were not met)."""
    b, missed = o.budget, []
    if o.status != 200 or o.error_type:
        missed.append({"budget_error": "rejected", "rate_limit_error": "overloaded"}.get(o.error_type or "", "failed"))
    else:
        ttft = o.ttft_ms if o.stream else o.e2e_ms
        if "max_ttft_ms" in b and (ttft is None or ttft > b["max_ttft_ms"]):
            missed.append("max_ttft_ms")
        if "max_latency_ms" in b and o.e2e_ms > b["max_latency_ms"]:
            missed.append("max_latency_ms")
        tpot = o.tpot_ms if o.stream else (o.e2e_ms / o.tokens if o.tokens > 1 else None)
        if "max_tpot_ms" in b and tpot is not None and tpot > b["max_tpot_ms"]:
            missed.append("max_tpot_ms")
        m = fig.member(o.member or o.model)
        if "max_memory_gb" in b and (m is None or fig.memory_gb(m) > b["max_memory_gb"]):
            missed.append("max_memory_gb")
        if "min_accuracy" in b and (m is None or (q := fig.quality(m)) is None or q < b["min_accuracy"]):
            missed.append("min_accuracy")
    o.missed, o.met = missed, not missed
    return o


def goodput_at_mix(result: dict, classes: list) -> float | None:
    """Per-class goodput weighted by the scenario's class weights.

    Users are paced but not open-loop: a user whose request outlasts its period starts the next one
    late, so a policy that serves a class slowly sends fewer requests of it, and one that rejects fast
    sends more. The plain share of requests then mixes the classes differently for every policy; this
    weighs them as the scenario means to (what an open-loop arrival process would give).
    """
    by = result["by_class"]
    present = [(c.weight, by[c.name]["goodput"]) for c in classes if by.get(c.name, {}).get("goodput") is not None]
    total = sum(w for w, _ in present)
    return round(sum(w * g for w, g in present) / total, 4) if total else None


def verdict(results: dict[str, dict]) -> dict:
    """The issue's targets, judged on the goodput at the scenario's class mix (`goodput_at_mix`)."""
    g, p, s = (results.get(k, {}).get("overall", {}).get("goodput_mix") for k in ("gateway", "parent", "static"))
    return {
        "gateway_goodput": g, "parent_goodput": p, "static_goodput": s,
        "gateway_beats_parent": g is not None and p is not None and g > p,
        "gateway_beats_static": g is not None and s is not None and g > s,
        "gateway_at_least_95pct": g is not None and g >= 0.95,
        "parent_below_half": p is not None and p < 0.5,
        "no_failures": all(r["overall"]["failed"] == 0 for r in results.values()),
    }
