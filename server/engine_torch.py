"""The embedded torch engine: serves one member with `transformers` where vLLM is not installed.

Design: step-level continuous batching, like vLLM's scheduler but without paging. One scheduler thread
owns the model and a running batch of at most `max_batch` rows sharing one KV cache (left-padded to a
common length, padding masked out, positions per row). Each iteration it (1) admits waiting requests
into free rows: their prompts are prefilled together and their caches spliced into the running one,
(2) decodes one token for every running row in one forward pass, and (3) drops the rows that finished
(eos, stop string, max_tokens, client gone), trimming cache columns no remaining row uses. So a request
arriving mid-generation starts at the next step instead of waiting for the batch to drain. Each row
samples with its own parameters and generator (seeded requests repeat). Tokens go to each request's
asyncio queue as they are produced, so streaming is token by token. A prompt is prefilled in one pass
(no chunked prefill): a long prompt delays the running rows by one prefill. A bounded waiting queue
makes overload a fast 429.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import family  # noqa: F401  (registers the low-rank architecture)
from family import defaults


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
    # Filled by the engine:
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None  # ("text", str) … then ("done", finish_reason) or ("error", msg)
    arrived: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    finish_reason: str | None = None
    cancelled: bool = False
    # Sampling state, owned by the scheduler thread:
    generator: torch.Generator | None = None
    counts: dict[int, int] = field(default_factory=dict)  # generated token → times (penalties)
    last_token_at: float = 0.0

    def push(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class _Batch:
    """The running rows and their shared KV cache, left-padded to one length (mask 0 on padding)."""

    def __init__(self, rows=None, cache=None, mask=None, next_pos=None, last=None):
        self.rows: list[GenRequest] = rows or []
        self.cache = cache  # transformers DynamicCache: per layer keys/values [rows, heads, width, head_dim]
        self.mask = mask if mask is not None else torch.zeros((0, 0), dtype=torch.long)  # [rows, width]
        self.next_pos = next_pos  # [rows] position of the next token
        self.last = last  # [rows] the token sampled last (the next step's input)

    def selected(self, keep: list[int]) -> "_Batch":
        """The rows at `keep`, without the leading cache columns none of them uses."""
        if len(keep) == len(self.rows):
            return self
        if not keep:
            return _Batch()
        idx = torch.tensor(keep, dtype=torch.long)
        mask = self.mask[idx]
        drop = int((mask.sum(0) == 0).cumprod(0).sum())
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, drop:], layer.values[idx, :, drop:]
        return _Batch([self.rows[i] for i in keep], self.cache, mask[:, drop:], self.next_pos[idx], self.last[idx])

    def merged(self, other: "_Batch") -> "_Batch":
        """This batch and `other` as one: both left-padded to the wider cache, rows stacked."""
        if not self.rows:
            return other
        if not other.rows:
            return self
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            extra = width - t.shape[dim]
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], dim=0)
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], dim=0)
        return _Batch(
            self.rows + other.rows, self.cache, torch.cat([pad(self.mask, 1), pad(other.mask, 1)], dim=0),
            torch.cat([self.next_pos, other.next_pos]), torch.cat([self.last, other.last]),
        )


class EngineStats:
    """Counters the worker's /metrics reads (plain numbers; the worker owns the Prometheus objects)."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.cache_tokens = 0


class TorchEngine:
    def __init__(
        self,
        member_dir: Path,
        *,
        max_model_len: int = defaults.MAX_MODEL_LEN,
        max_batch: int = 16,
        max_waiting: int = 64,
        dtype: str = "float32",
        observer=None,
    ):
        self.tokenizer = AutoTokenizer.from_pretrained(member_dir)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(member_dir, dtype=torch_dtype).eval()
        self.max_model_len = max_model_len
        self.max_batch = max_batch
        self.stats = EngineStats()
        self.observer = observer  # callbacks: ttft(s), itl(s), e2e(s), tokens(prompt, generated)
        self._waiting: queue.Queue[GenRequest] = queue.Queue(maxsize=max_waiting)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._thread.start()

    # --- prompts ------------------------------------------------------------------------------------

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    # --- submission ---------------------------------------------------------------------------------

    def submit(self, req: GenRequest) -> None:
        """Queue a request (from the event loop); raise QueueFull when the waiting queue is full."""
        req.loop = asyncio.get_running_loop()
        req.events = asyncio.Queue()
        try:
            self._waiting.put_nowait(req)
        except queue.Full:
            raise QueueFull from None
        self.stats.waiting = self._waiting.qsize()

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # --- the scheduler thread -----------------------------------------------------------------------

    def _run(self) -> None:
        batch = _Batch()
        while not self._stop.is_set():
            fresh: list[GenRequest] = []
            try:
                fresh = self._admit(block=not batch.rows)
                if fresh:
                    batch = batch.merged(self._prefill(fresh))
                if batch.rows:
                    batch = self._decode_step(batch)
            except Exception as exc:  # a failed step fails its requests, never the engine
                for r in batch.rows + fresh:
                    if r.finish_reason is None:
                        r.finish_reason = "error"
                        r.push("error", f"generation failed: {type(exc).__name__}: {exc}")
                batch = _Batch()
            finally:
                self.stats.running = len(batch.rows)
                self.stats.cache_tokens = int(batch.mask.sum()) if batch.rows else 0
                self.stats.waiting = self._waiting.qsize()

    def _admit(self, block: bool) -> list[GenRequest]:
        """Waiting requests that fit in the running batch (wait a little for one if nothing runs)."""
        room = self.max_batch - self.stats.running
        fresh: list[GenRequest] = []
        if block:
            try:
                fresh.append(self._waiting.get(timeout=0.05))
            except queue.Empty:
                return []
        while len(fresh) < room:
            try:
                fresh.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        return [r for r in fresh if not r.cancelled]

    @torch.no_grad()
    def _prefill(self, rows: list[GenRequest]) -> "_Batch":
        """Run the prompts of newly admitted rows (left-padded together); sample their first token."""
        self.stats.running += len(rows)
        n, width = len(rows), max(len(r.prompt_ids) for r in rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        fresh = _Batch(rows, out.past_key_values, mask, positions[:, -1] + 1, torch.zeros(n, dtype=torch.long))
        for r in rows:
            r.generator = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
            r.counts = {}
        return self._take_tokens(fresh, out.logits[:, -1].float(), first=True)

    @torch.no_grad()
    def _decode_step(self, batch: "_Batch") -> "_Batch":
        """One token for every running row, in one forward pass over the shared cache."""
        batch.mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=torch.long)], dim=1)
        out = self.model(
            input_ids=batch.last[:, None], attention_mask=batch.mask, position_ids=batch.next_pos[:, None],
            past_key_values=batch.cache, use_cache=True,
        )
        batch.cache = out.past_key_values
        batch.next_pos = batch.next_pos + 1
        return self._take_tokens(batch, out.logits[:, -1].float(), first=False)

    def _take_tokens(self, batch: "_Batch", logits: torch.Tensor, first: bool) -> "_Batch":
        """Sample one token per row, stream it, and drop the rows that finished."""
        now = time.perf_counter()
        keep = []
        for i, r in enumerate(batch.rows):
            tok = self._sample(logits[i], r)
            r.counts[tok] = r.counts.get(tok, 0) + 1
            self._observe("ttft" if first else "itl", now - (r.arrived if first else r.last_token_at))
            r.last_token_at = now
            batch.last[i] = tok
            if self._advance(r, tok):
                keep.append(i)
        return batch.selected(keep)

    def _sample(self, logits: torch.Tensor, r: GenRequest) -> int:
        if (r.frequency_penalty or r.presence_penalty) and r.counts:
            seen = torch.tensor(list(r.counts), dtype=torch.long)
            times = torch.tensor(list(r.counts.values()), dtype=logits.dtype)
            logits = logits.clone()
            logits[seen] -= r.frequency_penalty * times + r.presence_penalty
        if r.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < r.top_p  # smallest prefix whose mass reaches top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=r.generator))

    def _advance(self, r: GenRequest, tok: int) -> bool:
        """Take one generated token; stream what is safe to show; return whether the row goes on."""
        if r.cancelled:
            r.finish_reason = "cancelled"
            return False
        r.output_ids.append(tok)  # an eos counts as a completion token, as in vLLM's usage
        if tok in self.eos_ids and not r.ignore_eos:
            self._finish(r, "stop")
            return False
        r.text = self.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        for s in r.stop:
            cut = r.text.find(s)
            if cut >= 0:
                r.text = r.text[:cut]
                self._finish(r, "stop")
                return False
        if len(r.output_ids) >= r.max_tokens:
            self._finish(r, "length")
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

    def _finish(self, r: GenRequest, reason: str) -> None:
        if r.emitted < len(r.text):
            r.push("text", r.text[r.emitted:])
            r.emitted = len(r.text)
        r.finish_reason = reason
        self._observe("e2e", time.perf_counter() - r.arrived)
        self._observe("tokens", (len(r.prompt_ids), len(r.output_ids)))
        r.push("done", reason)

    def _observe(self, what: str, value) -> None:
        if self.observer is not None:
            self.observer(what, value)
