"""The embedded torch engine: one process serves several members, scheduled over one thread pool.

Why one process for many members: on a CPU host, N single-member processes each pinned to 1/N of
the cores leave cores idle whenever some members have no work, and pay the runtime (interpreter,
torch, its thread pools) N times. Here one scheduler thread owns every member's decoder
(server.decoder.StaticDecoder: static KV cache, stacked projections, a layout measured at load) and
runs each step with all of torch's threads, so whichever members have work get the whole machine.

Scheduling: step-level continuous batching per member, round-robin across members. Each round, for
every member in turn, the scheduler (1) admits that member's waiting requests into free slots and
prefills their prompts together, sampling each one's first token, and (2) decodes one token for every
running row of that member in one batched forward, then (3) drops the rows that finished (eos, stop
string, max_tokens, client gone), moving the last row into the freed slot so running rows stay in
slots 0..n-1. A member with work gets one step per round, so two busy members share the machine
step for step and an idle one costs nothing; requests that would miss their deadline (a caller's
latency budget) go first, and the rest wait up to a bound (server.deadline_scheduling). A request
arriving mid-generation starts at its member's next step. Each row samples with its own parameters and generator (seeded requests repeat). Tokens go
to each request's asyncio queue as produced (streaming is token by token). A bounded waiting queue per
member makes overload a fast 429.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import family  # noqa: F401  (registers the low-rank architecture)
from family import defaults
from server import deadline_scheduling
from server.decoder import StaticDecoder
from server.layout import DTYPES, Layout, plan_layout
from server.sampling import sample

log = logging.getLogger("server.engine_torch")


class QueueFull(Exception):
    pass


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    deadline: float | None = None  # perf_counter time the caller's latency budget runs out (server.deadline_scheduling)
    # Filled by the engine:
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None  # ("text", str) … then ("done", finish_reason) or ("error", msg)
    arrived: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    finish_reason: str | None = None
    cancelled: bool = False
    # Decoding state, owned by the scheduler thread:
    position: int = 0  # where the next token's key/value goes in this row's cache slot
    last: int = 0  # the token sampled last (the next step's input)
    generator: torch.Generator | None = None
    counts: dict[int, int] = field(default_factory=dict)  # generated token → times (penalties)
    last_token_at: float = 0.0

    def push(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class EngineStats:
    """Counters the worker's /metrics reads (plain numbers; the worker owns the Prometheus objects)."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.cache_tokens = 0


Observer = Callable[[str, str, object], None]  # (member, what, value): ttft(s), itl(s), e2e(s), tokens(prompt, generated)


class Member:
    """One served member: its tokenizer, decoder and layout, its waiting queue and running rows."""

    def __init__(self, name: str, member_dir: Path, *, max_model_len: int, max_batch: int, max_waiting: int,
                 dtype: str, layout: str, kernel: str = "measure"):
        self.name, self.dir = name, Path(member_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(member_dir)
        model = AutoModelForCausalLM.from_pretrained(member_dir, dtype=torch.float32 if dtype == "auto" else DTYPES[dtype]).eval()
        started = time.perf_counter()
        self.layout: Layout = plan_layout(model, dtype, layout, kernel)
        self.layout_seconds = time.perf_counter() - started
        eos = model.generation_config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.decoder = StaticDecoder(model, self.layout, max_slots=max_batch, max_len=max_model_len)
        del model
        self.max_batch, self.max_waiting = max_batch, max_waiting
        # submitted, not yet seen by the scheduler; bounded together with `pending` by max_waiting (TorchEngine.submit,
        # on the event loop, the only producer: the scheduler only takes, so the check cannot go stale)
        self.waiting: queue.Queue[GenRequest] = queue.Queue()
        self.pending: list[GenRequest] = []  # seen by the scheduler, not yet admitted (owned by its thread)
        self.rows: list[GenRequest] = []  # rows[i] decodes in cache slot i
        self.step_s = 0.0  # seconds a step of all its rows takes (prefill included; moving average): the pace of a round
        self.stats = EngineStats()
        record = self.layout.record()
        log.info("member %s served as %s on %s, projections %s (layout chosen in %.1f s)", name, record["dtype"],
                 record["kernel"], record["projections"], self.layout_seconds)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def collect(self) -> None:
        """Move what was submitted since the last round to `pending` (the scheduler's side)."""
        while True:
            try:
                self.pending.append(self.waiting.get_nowait())
            except queue.Empty:
                return

    def queued(self) -> int:
        return self.waiting.qsize() + len(self.pending)

    def admit(self, now: float, pace_s: float, max_defer_s: float = deadline_scheduling.MAX_DEFER_S) -> list[GenRequest]:
        """The waiting requests to prefill now, up to the free slots: earliest deadline first, and none
        that is not pressing while a pressing row would wait for its prefill (server.deadline_scheduling)."""
        self.pending = [r for r in self.pending if not r.cancelled]
        rows_pressing = any(deadline_scheduling.pressing(r, now, pace_s) for r in self.rows)
        fresh: list[GenRequest] = []
        for r in deadline_scheduling.admit_order(self.pending):
            if len(self.rows) + len(fresh) >= self.max_batch:
                break
            if deadline_scheduling.admissible(r, rows_pressing, now, pace_s, max_defer_s):
                fresh.append(r)
                rows_pressing = rows_pressing or deadline_scheduling.pressing(r, now, pace_s)
        taken = {id(r) for r in fresh}
        self.pending = [r for r in self.pending if id(r) not in taken]
        return fresh


class TorchEngine:
    def __init__(
        self,
        members: Mapping[str, Path],
        *,
        max_model_len: int = defaults.MAX_MODEL_LEN,
        max_batch: int = 16,
        max_waiting: int = 64,
        dtype: str = "float32",
        layout: str = "measure",
        kernel: str = "measure",
        observer: Observer | None = None,
    ):
        """`members`: served name → member folder. `dtype`: float32, bfloat16, float16 or auto (measured).
        `layout`: measure (each projection dense or factored, whichever is faster here), factored or dense.
        `kernel`: measure (aten or oneDNN, whichever runs the member's matmuls faster here), aten or onednn."""
        if not members:
            raise ValueError("an engine serves at least one member")
        self.members: dict[str, Member] = {}
        self.max_defer_s = deadline_scheduling.MAX_DEFER_S  # how long work without a deadline may be held back
        self.max_model_len = max_model_len
        self.max_batch = max_batch
        self.observer = observer
        self._wake = threading.Event()
        self._stop = threading.Event()
        loaded = threading.Event()
        failure: list[BaseException] = []

        def load_then_run() -> None:
            # The members are loaded (and their layouts timed) on the thread that will decode them: torch's
            # OpenMP pool belongs to the thread that first runs a parallel op, and a second pool made by
            # another thread made every decode step a third slower here (32 against 42 tok/s, parent, c=1).
            try:
                self.members = {name: Member(name, Path(d), max_model_len=max_model_len, max_batch=max_batch,
                                             max_waiting=max_waiting, dtype=dtype, layout=layout, kernel=kernel)
                                for name, d in members.items()}
            except BaseException as exc:  # noqa: BLE001  (re-raised in the constructor's thread)
                failure.append(exc)
                return
            finally:
                loaded.set()
            self._run()

        self._thread = threading.Thread(target=load_then_run, name="torch-engine", daemon=True)
        self._thread.start()
        loaded.wait()
        if failure:
            raise failure[0]

    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- submission ---------------------------------------------------------------------------------

    def submit(self, member: str, req: GenRequest) -> None:
        """Queue a request for `member` (from the event loop); raise QueueFull when its queue is full."""
        m = self.members[member]
        req.loop = asyncio.get_running_loop()
        req.events = asyncio.Queue()
        if m.queued() >= m.max_waiting:
            raise QueueFull
        m.waiting.put_nowait(req)
        m.stats.waiting = m.queued()
        self._wake.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    # --- the scheduler thread -----------------------------------------------------------------------

    def _run(self) -> None:
        members = list(self.members.values())
        while not self._stop.is_set():
            self._wake.clear()
            busy = False
            for m in members:
                m.collect()
            # Round-robin, one step for every member with work; while any holds a request that would miss
            # its deadline at that pace, the others wait their turn, up to a bound (server.deadline_scheduling).
            pace = sum(m.step_s for m in members if m.rows or m.pending)
            now = time.perf_counter()
            urgent = any(deadline_scheduling.any_pressing(m.rows, m.pending, now, pace) for m in members)
            for m in members:
                fresh: list[GenRequest] = []
                try:
                    now = time.perf_counter()
                    if not deadline_scheduling.steps(m.rows, m.pending, urgent, now, pace, self.max_defer_s):
                        continue
                    fresh = m.admit(now, pace, self.max_defer_s)
                    if fresh:
                        self._prefill(m, fresh)
                    whole = self._decode_step(m, pace) if m.rows else True
                    if whole:  # the pace of a round is that of whole steps (a step of pressing rows alone is faster)
                        took = time.perf_counter() - now
                        m.step_s = 0.8 * m.step_s + 0.2 * took if m.step_s else took
                except Exception as exc:  # a failed step fails its member's requests, never the engine
                    log.exception("step of member %s failed", m.name)
                    for r in m.rows + fresh:
                        if r.finish_reason is None:
                            r.finish_reason = "error"
                            r.push("error", f"generation failed: {type(exc).__name__}: {exc}")
                    m.rows = []
                finally:
                    m.stats.running = len(m.rows)
                    m.stats.cache_tokens = sum(r.position for r in m.rows)
                    m.stats.waiting = m.queued()
                    busy = busy or bool(m.rows) or m.stats.waiting > 0
            if not busy:
                self._wake.wait(0.05)

    def _prefill(self, m: Member, fresh: list[GenRequest]) -> None:
        """Prefill newly admitted rows into the next free slots; sample their first tokens."""
        first = len(m.rows)
        m.rows.extend(fresh)
        logits = m.decoder.prefill(first, [r.prompt_ids for r in fresh])
        for r in fresh:
            r.position = len(r.prompt_ids)
            r.generator = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
            r.counts = {}
        self._take_tokens(m, list(range(first, len(m.rows))), logits, first=True)

    def _decode_step(self, m: Member, pace_s: float = 0.0) -> bool:
        """One token for every running row of `m` in one forward pass over its cache, or, while some rows
        would miss their deadline at the round's pace, for those alone (server.deadline_scheduling).
        Whether every row stepped."""
        now = time.perf_counter()
        n = deadline_scheduling.pressing_first(m.rows, now, pace_s, self.max_defer_s)
        if n < len(m.rows):
            for a, b in deadline_scheduling.partition(m.rows, now, pace_s):
                m.decoder.swap(a, b, max(m.rows[a].position, m.rows[b].position))
        rows = m.rows[:n]
        tokens = torch.tensor([r.last for r in rows])
        positions = torch.tensor([r.position for r in rows])
        logits = m.decoder.decode(tokens, positions)
        for r in rows:
            r.position += 1
        whole = n == len(m.rows)
        self._take_tokens(m, list(range(n)), logits, first=False)
        return whole

    def _take_tokens(self, m: Member, slots: list[int], logits: torch.Tensor, first: bool) -> None:
        """Sample one token for each row at `slots`, stream it, and free the slots of rows that finished."""
        now = time.perf_counter()
        done = []
        for i, slot in enumerate(slots):
            r = m.rows[slot]
            tok = sample(logits[i], temperature=r.temperature, top_p=r.top_p, generator=r.generator, counts=r.counts,
                         frequency_penalty=r.frequency_penalty, presence_penalty=r.presence_penalty)
            r.counts[tok] = r.counts.get(tok, 0) + 1
            self._observe(m, "ttft" if first else "itl", now - (r.arrived if first else r.last_token_at))
            r.last_token_at = now
            r.last = tok
            if not self._advance(m, r, tok):
                done.append(slot)
        for slot in sorted(done, reverse=True):  # the last row moves into the freed slot
            tail = len(m.rows) - 1
            if slot != tail:
                m.decoder.move(tail, slot, m.rows[tail].position)
                m.rows[slot] = m.rows[tail]
            m.rows.pop()

    def _advance(self, m: Member, r: GenRequest, tok: int) -> bool:
        """Take one generated token; stream what is safe to show; return whether the row goes on."""
        if r.cancelled:
            r.finish_reason = "cancelled"
            return False
        r.output_ids.append(tok)  # an eos counts as a completion token, as in vLLM's usage
        if tok in m.eos_ids and not r.ignore_eos:
            self._finish(m, r, "stop")
            return False
        r.text = m.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        for s in r.stop:
            cut = r.text.find(s)
            if cut >= 0:
                r.text = r.text[:cut]
                self._finish(m, r, "stop")
                return False
        if len(r.output_ids) >= r.max_tokens:
            self._finish(m, r, "length")
            return False
        # Hold back an incomplete UTF-8 character and anything that could be the start of a stop string.
        hold = max((len(s) - 1 for s in r.stop), default=0)
        safe = len(r.text) - hold
        if r.text.endswith("\ufffd"):
            safe = min(safe, len(r.text) - 1)
        if safe > r.emitted:
            r.push("text", r.text[r.emitted:safe])
            r.emitted = safe
        return True

    def _finish(self, m: Member, r: GenRequest, reason: str) -> None:
        if r.emitted < len(r.text):
            r.push("text", r.text[r.emitted:])
            r.emitted = len(r.text)
        r.finish_reason = reason
        self._observe(m, "e2e", time.perf_counter() - r.arrived)
        self._observe(m, "tokens", (len(r.prompt_ids), len(r.output_ids)))
        r.push("done", reason)

    def _observe(self, m: Member, what: str, value) -> None:
        if self.observer is not None:
            self.observer(m.name, what, value)

