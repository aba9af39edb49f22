"""An OpenAI-compatible worker for one or several members on the embedded torch engine.

It speaks the same protocol as vLLM's server (the endpoints, SSE streaming, `/health`, and `/metrics`
with vLLM's metric names, labelled per member by `model_name`), so the gateway reads every worker the
same way, whichever engine runs it. Several members share one engine (server.engine_torch): the
request's `model` picks the member; /v1/models lists them all; a model it does not hold is a 404.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import AsyncIterator, Mapping

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from family import defaults
from server import deadline_scheduling
from server.engine_torch import GenRequest, Member, QueueFull, TorchEngine
from server.errors import APIError, install_error_handlers, not_found, overloaded
from server.protocol import (
    SSE_DONE,
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingParams,
    Usage,
    new_id,
    sse,
)

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class WorkerMetrics:
    """vLLM's metric names, so dashboards and the gateway need not care which engine runs."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a batch", labels, registry=r)
        self.kv = Gauge("vllm:kv_cache_usage_perc", "Share of the KV-cache budget in use (0-1)", labels, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt = Counter("vllm:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation = Counter("vllm:generation_tokens", "Tokens generated", labels, registry=r)

    def observe(self, member: str, what: str, value) -> None:
        if what == "ttft":
            self.ttft.labels(member).observe(value)
        elif what == "itl":
            self.itl.labels(member).observe(value)
        elif what == "e2e":
            self.e2e.labels(member).observe(value)
        elif what == "tokens":
            self.prompt.labels(member).inc(value[0])
            self.generation.labels(member).inc(value[1])

    def refresh(self, engine: TorchEngine) -> None:
        capacity = engine.max_batch * engine.max_model_len
        for name, m in engine.members.items():
            self.running.labels(name).set(m.stats.running)
            self.waiting.labels(name).set(m.queued())
            self.kv.labels(name).set(min(1.0, m.stats.cache_tokens / capacity))


def create_app(
    members: Path | Mapping[str, Path],
    name: str | None = None,
    *,
    max_model_len: int = defaults.MAX_MODEL_LEN,
    max_batch: int = 16,
    max_waiting: int = 64,
    dtype: str = "float32",
    layout: str = "measure",
    kernel: str = "measure",
) -> FastAPI:
    """The worker app. `members`: {served name: member folder}; or one member folder with its `name`.
    `max_batch`, `max_waiting`: per member. `dtype`, `layout`, `kernel`: see server.engine_torch.TorchEngine."""
    members = {name: Path(members)} if isinstance(members, (str, Path)) else {k: Path(v) for k, v in members.items()}
    metrics = WorkerMetrics()
    engine = TorchEngine(
        members, max_model_len=max_model_len, max_batch=max_batch, max_waiting=max_waiting,
        dtype=dtype, layout=layout, kernel=kernel, observer=metrics.observe,
    )
    served = ", ".join(members)
    app = FastAPI(title=f"family worker: {served} (torch)")
    install_error_handlers(app)
    app.state.engine = engine

    @app.on_event("shutdown")
    def _stop() -> None:
        engine.shutdown()

    def member_of(model: str | None) -> Member:
        if model not in engine.members:
            raise not_found(f"this worker serves {served}, not {model!r}")
        return engine.members[model]

    def make_request(m: Member, body: SamplingParams, prompt_ids: list[int], request: Request) -> GenRequest:
        max_tokens = body.resolved_max_tokens()
        if len(prompt_ids) + max_tokens > max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens; the request has {len(prompt_ids)} "
                f"prompt tokens and asks for {max_tokens} more",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        req = GenRequest(
            prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=body.resolved_temperature(),
            top_p=body.resolved_top_p(), stop=body.stop_list(), seed=body.seed,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            ignore_eos=body.ignore_eos,
        )
        budget_s = deadline_scheduling.parse_deadline_ms(request.headers.get(deadline_scheduling.HEADER))
        req.deadline = req.arrived + budget_s if budget_s is not None else None
        try:
            engine.submit(m.name, req)
        except QueueFull:
            raise overloaded(f"worker for {m.name} is at capacity ({max_waiting} waiting); retry shortly") from None
        return req

    async def collect(req: GenRequest) -> tuple[str, str]:
        parts = []
        while True:
            kind, value = await req.events.get()
            if kind == "text":
                parts.append(value)
            elif kind == "done":
                return "".join(parts), value
            else:
                raise APIError(500, value, type="server_error")

    async def stream(req: GenRequest, request: Request, chunk, usage_chunk, include_usage: bool) -> AsyncIterator[str]:
        try:
            yield sse(chunk(None, None, first=True))
            while True:
                kind, value = await req.events.get()
                if kind == "text":
                    yield sse(chunk(value, None))
                elif kind == "done":
                    yield sse(chunk(None, value))
                    break
                else:
                    yield sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                    break
            if include_usage:
                yield sse(usage_chunk(usage_of(req)))
            yield SSE_DONE
        finally:
            req.cancelled = req.finish_reason is None  # client went away: free the batch slot

    def usage_of(req: GenRequest) -> Usage:
        p, c = len(req.prompt_ids), len(req.output_ids)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    @app.get("/health")
    async def health() -> dict:
        if not engine.alive():
            raise APIError(503, "engine thread is not running", type="server_error")
        # `serving`: how each member is served here (dtype, dense or factored projections, the timings
        # that chose them): the recorded choice of server.layout.
        return {"status": "ok", "models": list(engine.members), "engine": "torch",
                "serving": {name: m.layout.record() for name, m in engine.members.items()}}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.refresh(engine)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=m.name, max_model_len=max_model_len, root=str(m.dir))
                               for m in engine.members.values()])

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        m = member_of(body.model)
        messages = [{"role": msg.role, "content": msg.text()} for msg in body.messages]
        req = make_request(m, body, m.chat_prompt_ids(messages), request)
        name = m.name
        if body.stream:
            rid, created = new_id("chatcmpl"), int(time.time())

            def chunk(text, finish, first=False):
                delta = ChatDelta(role="assistant", content="") if first else ChatDelta(content=text)
                return ChatCompletionChunk(id=rid, created=created, model=name, choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])

            def usage_chunk(usage):
                return ChatCompletionChunk(id=rid, created=created, model=name, choices=[], usage=usage)

            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(req, request, chunk, usage_chunk, include), media_type="text/event-stream")
        text, finish = await collect(req)
        return ChatCompletionResponse(
            model=name, choices=[ChatChoice(message=ChatChoiceMessage(content=text), finish_reason=finish)], usage=usage_of(req)
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        m = member_of(body.model)
        req = make_request(m, body, m.text_prompt_ids(body.prompt), request)
        name = m.name
        if body.stream:
            rid, created = new_id("cmpl"), int(time.time())

            def chunk(text, finish, first=False):
                return CompletionChunk(id=rid, created=created, model=name, choices=[CompletionChunkChoice(text=text or "", finish_reason=finish)])

            def usage_chunk(usage):
                return CompletionChunk(id=rid, created=created, model=name, choices=[], usage=usage)

            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(req, request, chunk, usage_chunk, include), media_type="text/event-stream")
        text, finish = await collect(req)
        return CompletionResponse(model=name, choices=[CompletionChoice(text=text, finish_reason=finish)], usage=usage_of(req))

    return app
