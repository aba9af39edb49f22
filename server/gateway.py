"""The gateway: an OpenAI-compatible API over a family of members and a fleet of workers.

`model` names a member (pinned) or the family (routed by budget). Each request is routed
(server.router), sent to a worker with retries on another worker or the next member for connection
errors, 5xx and 429 before the first token, and relayed back, streamed or not. The chosen member,
worker and predicted latency come back in `x-family-*` response headers.
"""

from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from transformers import AutoTokenizer

from family.registry import Family
from server.auth import Auth, KeySpec
from server.errors import APIError, install_error_handlers, not_found
from server.fleet import WorkerSpec
from server.metrics import GatewayMetrics
from server.pool import Pool
from server.protocol import SSE_DONE, Budget, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, sse
from server.router import Choice, best_effort, no_fit_error, route

BUDGET_HEADERS = {
    "x-budget-memory-gb": "max_memory_gb",
    "x-slo-ttft-ms": "max_ttft_ms",
    "x-slo-latency-ms": "max_latency_ms",
    "x-min-accuracy": "min_accuracy",
    "x-allow-best-effort": "allow_best_effort",
}
MAX_ATTEMPTS = 3


def budget_from_headers(request: Request) -> Budget | None:
    fields = {f: request.headers[h] for h, f in BUDGET_HEADERS.items() if h in request.headers}
    if not fields:
        return None
    try:
        return Budget.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        header = next(h for h, f in BUDGET_HEADERS.items() if f == first["loc"][0])
        raise APIError(400, f"header {header}: {first['msg']}", param=header, code="invalid_budget") from None


def resolve_budget(body_budget: Budget | None, request: Request, key: KeySpec | None) -> Budget:
    """Body overrides headers, which override the key's default."""
    budget = Budget()
    for layer in (key.budget if key else None, budget_from_headers(request), body_budget):
        if layer is not None:
            budget = layer.merged_over(budget)
    return budget


def route_headers(choice: Choice) -> dict[str, str]:
    h = {"x-family-member": choice.member.name, "x-family-worker": choice.worker.name, "x-family-route": choice.reason}
    if choice.predicted is not None:
        h["x-family-predicted-ttft-ms"] = f"{choice.predicted.ttft_s * 1e3:.1f}"
        h["x-family-predicted-latency-ms"] = f"{choice.predicted.e2e_s * 1e3:.1f}"
    return h


class Gateway:
    """The request path: route, send with retries, relay, observe."""

    def __init__(self, family: Family, pool: Pool, metrics: GatewayMetrics, tokenizer, timeout: float, live: bool):
        self.family, self.pool, self.metrics, self.tokenizer = family, pool, metrics, tokenizer
        self.timeout = httpx.Timeout(timeout, connect=2.0)
        self.live = live

    def prompt_tokens(self, body: ChatCompletionRequest | CompletionRequest) -> int:
        if isinstance(body, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = body.prompt
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def candidates(self, budget: Budget, pinned: str | None, p: int, o: int, tried: set[str], first_attempt: bool,
                   prompt_param: str) -> list[Choice]:
        result = route(self.family, self.pool, budget, prompt_tokens=p, max_tokens=o, pinned=pinned, exclude=tried, live=self.live)
        choices = result.choices
        if not choices and budget.allow_best_effort:
            choices = best_effort(self.family, self.pool, result, prompt_tokens=p, max_tokens=o, exclude=tried, live=self.live)
        if not choices and first_attempt:
            err = no_fit_error(result, budget, pinned, prompt_param)
            self.metrics.rejections.labels(err.param or err.code or "none").inc()
            raise err
        return choices

    def check_budget(self, choice: Choice, budget: Budget, ttft: float | None, e2e: float) -> None:
        member = choice.member.name
        if budget.max_ttft_ms is not None and ttft is not None and ttft * 1e3 > budget.max_ttft_ms:
            self.metrics.budget_misses.labels(member, "max_ttft_ms").inc()
        if budget.max_latency_ms is not None and e2e * 1e3 > budget.max_latency_ms:
            self.metrics.budget_misses.labels(member, "max_latency_ms").inc()

    async def handle(self, path: str, body: ChatCompletionRequest | CompletionRequest, budget: Budget, pinned: str | None) -> Response:
        p, o = self.prompt_tokens(body), body.resolved_max_tokens()
        prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        payload = body.model_dump(exclude_none=True, exclude={"budget"})
        tried: set[str] = set()
        first_member: str | None = None
        last_429: httpx.Response | None = None
        for attempt in range(MAX_ATTEMPTS):
            choices = self.candidates(budget, pinned, p, o, tried, attempt == 0, prompt_param)
            if not choices:
                break
            choice = choices[0]
            first_member = first_member or choice.member.name
            if choice.member.name != first_member:
                self.metrics.fallbacks.labels(first_member, choice.member.name).inc()
            self.metrics.routing.labels(choice.member.name, choice.reason).inc()
            w = choice.worker
            tried.add(w.name)
            payload["model"] = choice.member.name
            start = time.perf_counter()
            w.in_flight += 1
            self.metrics.in_flight.labels(w.name).set(w.in_flight)
            released = False
            try:
                req = self.pool.client.build_request("POST", f"{w.name}{path}", json=payload, headers=self.pool.headers(w), timeout=self.timeout)
                upstream = await self.pool.client.send(req, stream=True)
                if upstream.status_code >= 500 or upstream.status_code == 429:
                    await upstream.aread()
                    await upstream.aclose()
                    if upstream.status_code == 429:
                        last_429 = upstream
                        self.metrics.retries.labels(w.name, "429").inc()
                    else:
                        self.pool.fail(w, f"HTTP {upstream.status_code}")
                        self.metrics.retries.labels(w.name, "5xx").inc()
                    continue
                if upstream.status_code != 200:  # the worker's own 4xx: the caller's mistake, pass it on
                    content = await upstream.aread()
                    await upstream.aclose()
                    self.metrics.requests.labels(choice.member.name, w.name, f"http_{upstream.status_code}").inc()
                    return Response(content, status_code=upstream.status_code, media_type="application/json", headers=route_headers(choice))
                if body.stream:
                    first = await self._first_event(upstream)
                    released = True  # the stream owns the in-flight count from here
                    return StreamingResponse(self._relay(upstream, first, choice, budget, start), media_type="text/event-stream",
                                             headers=route_headers(choice))
                content = await upstream.aread()
                await upstream.aclose()
                e2e = time.perf_counter() - start
                self._observe_whole(choice, content, e2e, budget)
                return Response(content, media_type="application/json", headers=route_headers(choice))
            except (httpx.TransportError, _UpstreamEnded) as exc:
                self.pool.fail(w, f"{type(exc).__name__}")
                self.metrics.retries.labels(w.name, "connection").inc()
            finally:
                if not released:
                    w.in_flight -= 1
                    self.metrics.in_flight.labels(w.name).set(w.in_flight)
        if last_429 is not None:
            raise APIError(429, "every worker that fits is at capacity; retry shortly", type="rate_limit_error", code="overloaded",
                           headers={"Retry-After": last_429.headers.get("retry-after", "1")})
        raise APIError(502, "no upstream worker could serve the request after retries", type="server_error", code="upstream_failed")

    async def _first_event(self, upstream: httpx.Response) -> tuple[AsyncIterator[str], list[str]]:
        """Read up to the first data line, so a worker that fails before its first token is retried."""
        lines = upstream.aiter_lines()
        head: list[str] = []
        try:
            async for line in lines:
                if line:
                    head.append(line)
                if line.startswith("data:"):
                    return lines, head
        except httpx.HTTPError:
            await upstream.aclose()
            raise _UpstreamEnded from None
        await upstream.aclose()
        raise _UpstreamEnded

    async def _relay(self, upstream: httpx.Response, first, choice: Choice, budget: Budget, start: float) -> AsyncIterator[str]:
        lines, head = first
        w, member = choice.worker, choice.member.name
        ttft = last = None
        chunks = 0
        outcome, done = "ok", False
        try:
            for line in head:
                yield line + "\n\n"
            async for line in lines:
                if not line:
                    continue
                now = time.perf_counter()
                if line == "data: [DONE]":
                    done = True
                elif '"content":"' in line or '"text":"' in line:
                    if ttft is None:
                        ttft = now - start
                        self.metrics.ttft.labels(member).observe(ttft)
                    elif last is not None:
                        self.metrics.itl.labels(member).observe(now - last)
                    last = now
                    chunks += 1
                yield line + "\n\n"
            if not done:
                raise _UpstreamEnded
        except (httpx.HTTPError, _UpstreamEnded):
            outcome = "stream_error"
            self.pool.fail(w, "stream ended early")
            yield sse({"error": {"message": f"worker {w.name} failed mid-stream", "type": "server_error", "param": None, "code": "upstream_failed"}})
            yield SSE_DONE
        finally:
            await upstream.aclose()
            w.in_flight -= 1
            self.metrics.in_flight.labels(w.name).set(w.in_flight)
            e2e = time.perf_counter() - start
            self.metrics.e2e.labels(member).observe(e2e)
            self.metrics.requests.labels(member, w.name, outcome).inc()
            if outcome == "ok":
                pred = choice.predicted
                if pred is not None and ttft is not None and last is not None:
                    base_ttft = pred.ttft_s / w.ttft_ratio if self.live else pred.ttft_s
                    base_tpot = pred.tpot_s / w.tpot_ratio if self.live else pred.tpot_s
                    tpot = (last - start - ttft) / (chunks - 1) if chunks > 1 else None
                    w.observe(base_ttft, ttft, base_tpot, tpot)
                self.check_budget(choice, budget, ttft, e2e)

    def _observe_whole(self, choice: Choice, content: bytes, e2e: float, budget: Budget) -> None:
        import json

        w, member = choice.worker, choice.member.name
        self.metrics.e2e.labels(member).observe(e2e)
        self.metrics.requests.labels(member, w.name, "ok").inc()
        pred = choice.predicted
        if pred is not None:
            try:
                n = json.loads(content)["usage"]["completion_tokens"]
            except (ValueError, KeyError, TypeError):
                n = 0
            if n > 1:
                base_tpot = pred.tpot_s / w.tpot_ratio if self.live else pred.tpot_s
                observed_tpot = max(0.0, e2e - pred.ttft_s) / (n - 1)
                w.observe(None, None, base_tpot, observed_tpot)
        self.check_budget(choice, budget, None, e2e)


class _UpstreamEnded(Exception):
    """The worker's stream ended before [DONE] (it died or closed the connection)."""


def create_app(family: Family, workers: list[WorkerSpec], *, auth: Auth | None = None, timeout: float = 120.0,
               health_interval: float = 2.0, live: bool = True) -> FastAPI:
    auth = auth or Auth()
    metrics = GatewayMetrics()
    tokenizer = AutoTokenizer.from_pretrained(family.member_dir(family.registry.parent))
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256), timeout=timeout)
        pool = Pool(workers, client, metrics, interval=health_interval)
        await pool.start()
        state["gateway"] = Gateway(family, pool, metrics, tokenizer, timeout, live)
        try:
            yield
        finally:
            await pool.stop()
            await client.aclose()

    app = FastAPI(title=f"family gateway: {family.registry.name}", lifespan=lifespan)
    install_error_handlers(app)
    name = family.registry.name

    def caller(request: Request) -> KeySpec | None:
        key = auth.identify(request.headers.get("authorization"))
        return key

    def pinned_member(model: str) -> str | None:
        if model == name:
            return None
        if model not in family.registry.names():
            raise not_found(f"model {model!r} does not exist; use {name!r} (routed by budget) or a member: {', '.join(m.name for m in family.servable)}")
        if model in family.problems:
            raise APIError(503, f"member {model!r} is not servable: {family.problems[model]}", type="server_error", param="model")
        return model

    async def completion(path: str, body, request: Request) -> Response:
        key = caller(request)
        auth.admit(key)
        pinned = pinned_member(body.model)
        budget = resolve_budget(body.budget, request, key)
        return await state["gateway"].handle(path, body, budget, pinned)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await completion("/v1/chat/completions", body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await completion("/v1/completions", body, request)

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        caller(request)
        servable = family.servable
        cards = [ModelCard(id=name, max_model_len=max((m.max_model_len for m in servable), default=None))]
        cards += [ModelCard(id=m.name, max_model_len=m.max_model_len, root=m.name, parent=name) for m in servable]
        return ModelList(data=cards)

    @app.get("/v1/family")
    async def family_state(request: Request) -> JSONResponse:
        auth.require_admin(caller(request))
        data = family.registry.model_dump(mode="json")
        data["problems"] = family.problems
        data["workers"] = [w.public() for w in state["gateway"].pool.workers]
        return JSONResponse(data)

    @app.get("/health")
    async def health() -> JSONResponse:
        pool = state["gateway"].pool
        up = sum(w.available() for w in pool.workers)
        body = {"status": "ok" if up else "unavailable", "healthy_workers": up, "workers": len(pool.workers)}
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        auth.require_admin(caller(request))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
