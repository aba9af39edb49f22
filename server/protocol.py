"""The OpenAI wire types, in one place (pydantic v2), shared by the workers and the gateway.

Only what this product serves is modelled; unknown fields that OpenAI clients send are accepted and
ignored (the gateway does not forward them: a field it cannot validate must not reach a worker that
might choke on it). `budget` is this product's one extension: what the caller can afford, used by the
gateway.

Every field a worker would reject is bounded here, at the edge, so a worker never sees it: integers
within what the engines accept (`seed` is a signed 64-bit integer, as OpenAI and vLLM take it), string
and list lengths. A request outside them is the caller's mistake, a 400, never a worker's 5xx.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from family import defaults


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOKENS_LIMIT = 2**31 - 1  # a bound for ints the engines store as int32; the router's context check is tighter
MAX_STOP_CHARS = 512  # per stop string: matched against the generated text at every step
MAX_MESSAGES = 2048
MAX_NAME_CHARS = 256  # model and user ids
# Who yields under overload (server.priority): critical keeps its member and jumps the gateway's queue,
# sheddable is downshifted to a smaller member, then refused with Retry-After.
Priority = Literal["critical", "standard", "sheddable"]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class Budget(BaseModel):
    """What a request can afford. Every field is optional; a missing one is no constraint."""

    model_config = ConfigDict(extra="forbid")
    max_memory_gb: float | None = Field(default=None, gt=0)
    max_ttft_ms: float | None = Field(default=None, gt=0)
    max_latency_ms: float | None = Field(default=None, gt=0)
    max_tpot_ms: float | None = Field(default=None, gt=0, description="time per output token after the first (llm-d's x-slo-tpot-ms)")
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    allow_best_effort: bool = False

    def merged_over(self, base: "Budget | None") -> "Budget":
        """This budget's fields, falling back to `base` for the ones not set here."""
        if base is None:
            return self
        mine = self.model_dump(exclude_unset=True)
        return Budget(**{**base.model_dump(exclude_unset=True), **mine})


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingParams(_Lenient):
    """The sampling fields common to chat and text completions."""

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is served")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX, description="a signed 64-bit integer")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (profiling, load tests)
    budget: Budget | None = None
    priority: Priority | None = None  # this product's; never forwarded (vLLM's own `priority` is an int)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string is at most {MAX_STOP_CHARS} characters")
        return stops or None

    def upstream_payload(self) -> dict:
        """What a worker is sent: the declared fields that are set; never `budget`, never unknown extras."""
        return self.model_dump(include=_forwarded(type(self)), exclude_none=True)

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def resolved_max_tokens(self) -> int:
        return self.max_tokens or defaults.DEFAULT_MAX_TOKENS

    def resolved_temperature(self) -> float:
        return defaults.DEFAULT_TEMPERATURE if self.temperature is None else self.temperature

    def resolved_top_p(self) -> float:
        return defaults.DEFAULT_TOP_P if self.top_p is None else self.top_p


_FORWARDED: dict[type, dict] = {}


def _forwarded(cls: type[BaseModel]) -> dict:
    """The `include` spec of a request class: its declared fields less the gateway's own (`budget`,
    `priority`); messages as role + content."""
    spec = _FORWARDED.get(cls)
    if spec is None:
        spec = {f: True for f in cls.model_fields if f not in ("budget", "priority")}
        if "messages" in spec:
            spec["messages"] = {"__all__": {"role": True, "content": True}}
        _FORWARDED[cls] = spec
    return spec


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)

    @model_validator(mode="after")
    def _max_tokens_alias(self):
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(SamplingParams):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt is served per request")
            v = v[0]
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


FinishReason = Literal["stop", "length"]


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "family"
    max_model_len: int | None = None
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event line carrying a JSON payload."""
    body = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) else __import__("json").dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"
