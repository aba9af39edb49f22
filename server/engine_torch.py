"""The embedded torch engine: serves one member with `transformers` where vLLM is not installed.

Design (simple, and correct under concurrency): one scheduler thread owns the model. It takes up to
`max_batch` waiting requests, left-pads them into one batch and decodes them together step by step
with one KV cache; each row samples with its own parameters and stops on its own (eos, stop string,
max_tokens). Requests that arrive while a batch runs wait for the next batch ("dynamic batching",
not vLLM's iteration-level continuous batching). Tokens are pushed to each request's asyncio queue as
they are produced, so streaming is token by token. A bounded waiting queue makes overload a fast 429.
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

    def push(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


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
        while not self._stop.is_set():
            try:
                first = self._waiting.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            batch = [r for r in batch if not r.cancelled]
            self.stats.waiting = self._waiting.qsize()
            if not batch:
                continue
            try:
                self._generate(batch)
            except Exception as exc:  # a failed batch fails its requests, never the engine
                for r in batch:
                    if r.finish_reason is None:
                        r.push("error", f"generation failed: {type(exc).__name__}: {exc}")
            finally:
                self.stats.running = 0
                self.stats.cache_tokens = 0

    @torch.no_grad()
    def _generate(self, batch: list[GenRequest]) -> None:
        self.stats.running = len(batch)
        n = len(batch)
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        vocab = self.model.config.vocab_size
        counts = torch.zeros((n, vocab), dtype=torch.float32)
        generators = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in batch]
        active = [True] * n
        cache = None
        last_token_at = [0.0] * n
        steps = max(r.max_tokens for r in batch)
        for step in range(steps):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
            next_ids = torch.empty(n, dtype=torch.long)
            now = time.perf_counter()
            for i, r in enumerate(batch):
                if not active[i]:
                    next_ids[i] = self.pad_id
                    continue
                next_ids[i] = self._sample(logits[i], counts[i], r, generators[i])
                counts[i, next_ids[i]] += 1
                tok = int(next_ids[i])
                if step == 0:
                    self._observe("ttft", now - r.arrived)
                else:
                    self._observe("itl", now - last_token_at[i])
                last_token_at[i] = now
                active[i] = self._advance(r, tok)
            self.stats.running = sum(active)
            self.stats.cache_tokens = int(mask.sum())
            if not any(active):
                break
            ids = next_ids[:, None]
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
        for i, r in enumerate(batch):
            if r.finish_reason is None:  # ran out of steps: only possible at max_tokens
                self._finish(r, "length")

    def _sample(self, logits: torch.Tensor, counts: torch.Tensor, r: GenRequest, gen: torch.Generator | None) -> int:
        if r.frequency_penalty or r.presence_penalty:
            logits = logits - r.frequency_penalty * counts - r.presence_penalty * (counts > 0).float()
        if r.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < r.top_p  # smallest prefix whose mass reaches top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=gen))

    def _advance(self, r: GenRequest, tok: int) -> bool:
        """Take one generated token; stream what is safe to show; return whether the row goes on."""
        if r.cancelled:
            r.finish_reason = "cancelled"
            return False
        if tok in self.eos_ids and not r.ignore_eos:
            self._finish(r, "stop")
            return False
        r.output_ids.append(tok)
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
