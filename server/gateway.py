"""The gateway: an OpenAI-compatible API over a family of members and a fleet of workers.

`model` names a member (pinned) or the family (routed by budget). Each request is routed
(server.router), sent to a worker with retries on another worker or the next member for connection
errors, 5xx and 429 before the first token, and relayed back, streamed or not. The chosen member,
worker and predicted latency come back in `x-family-*` response headers. A worker's 429 is passed on
(with its Retry-After) only when no other worker or member can take the request; a stream whose
worker dies after the first token ends with an error event and `data: [DONE]`.

Hostile input (issue 13) is stopped before it costs anything or reaches a worker: body size and prompt
length (server.limits), field ranges (server.protocol), key caps (server.caps), and a request that
fails with a 5xx on two workers is answered as the request's fault without cooling anyone down
(server.isolation). Relaying and observing a worker's answer is server.relay.

Upstream calls go through one aiohttp session (a keep-alive pool for every worker): on this
project's 2-core machines it costs about a quarter of httpx's per-request CPU, which is most of what
the gateway adds to a request (benchmarks/gateway_overhead.py).
"""

from __future__ import annotations

import contextlib
import json
import time

import aiohttp
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from family.registry import Family
from server.auth import Auth, KeySpec
from server.caps import OPEN, Grant, grant_for
from server.errors import APIError, install_error_handlers, not_found
from server.fleet import WorkerSpec
from server.affinity import Affinity, AffinityKey, affinity_key
from server.deadline_scheduling import with_deadline
from server.deadlines import DEFAULT_S as FIRST_TOKEN_S, FirstTokenTimeout, first_token_deadline, no_first_token_error
from server.isolation import Attempts
from server.limits import BodyLimit, Limits, check_prompt_chars, on_finish
from server.metrics import GatewayMetrics, budget_class
from server.pool import UPSTREAM_ERRORS, Pool
from server.priority import Admission, Admitted, RoutingPolicy, resolve_priority
from server.protocol import Budget, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, Priority
from server.quotas import NO_QUOTA, FailurePolicy, Quotas, Ticket
from server.relay import Relay, UpstreamEnded, by_deadline, total_tokens
from server.router import Choice, best_effort, no_fit_error, route
from server.state import StateBackend
from server.tokens import Tokenizers
from server.tracing import NO_TRACE, RequestTrace, Tracing

BUDGET_HEADERS = {
    "x-budget-memory-gb": "max_memory_gb",
    "x-slo-ttft-ms": "max_ttft_ms",
    "x-slo-latency-ms": "max_latency_ms",
    "x-slo-tpot-ms": "max_tpot_ms",
    "x-min-accuracy": "min_accuracy",
    "x-allow-best-effort": "allow_best_effort",
}
MAX_ATTEMPTS = 3
# Idle upstream connections are dropped before the workers drop them (uvicorn and vLLM: 5 s), so a
# request never lands on a connection the worker is closing.
KEEPALIVE_S = 4.0


def upstream_session() -> aiohttp.ClientSession:
    """The one connection pool for every worker: keep-alive connections are reused across requests."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024, limit_per_host=256, keepalive_timeout=KEEPALIVE_S))


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
    layers = [layer for layer in (key.budget if key else None, budget_from_headers(request), body_budget) if layer is not None]
    if len(layers) == 1:  # the common case: merging one layer over nothing gives the same budget (never mutated later)
        return layers[0]
    budget = Budget()
    for layer in layers:
        budget = layer.merged_over(budget)
    return budget


def route_headers(choice: Choice) -> dict[str, str]:
    h = {"x-family-member": choice.member.name, "x-family-worker": choice.worker.name, "x-family-route": choice.reason}
    if choice.predicted is not None:
        h["x-family-predicted-ttft-ms"] = f"{choice.predicted.ttft_s * 1e3:.1f}"
        h["x-family-predicted-latency-ms"] = f"{choice.predicted.e2e_s * 1e3:.1f}"
    if choice.warning is not None:  # a pinned member that routed traffic never reaches (unfit)
        h["x-family-warning"] = choice.warning
    return h


class Gateway:
    """The request path: route, send with retries, relay, observe."""

    def __init__(self, family: Family, pool: Pool, metrics: GatewayMetrics, tokenizers: Tokenizers, timeout: float, live: bool,
                 admission: Admission | None = None, affinity: Affinity | None = None, first_token_s: float = FIRST_TOKEN_S):
        self.family, self.pool, self.metrics, self.tokenizers = family, pool, metrics, tokenizers
        # connect: 2 s; sock_read: the longest silence allowed from a worker (also between stream chunks).
        self.timeout = aiohttp.ClientTimeout(total=None, connect=2.0, sock_connect=2.0, sock_read=timeout)
        self.live = live
        self.admission = admission or Admission(metrics)  # worker slots and the priority queue (server.priority)
        self.affinity = affinity or Affinity(metrics)  # session and prefix affinity (server.affinity)
        self.first_token_s = first_token_s  # default first-token deadline (server.deadlines)
        self.relay = Relay(pool, metrics, self.admission, live)  # relaying and observing answers (server.relay)

    async def admit(self, budget: Budget, pinned: str | None, p: dict[str, int], o: int, tried: set[str], first_attempt: bool,
                    prompt_param: str, grant: Grant = OPEN, priority: Priority = "standard", key: AffinityKey | None = None,
                    ) -> Admitted | None:
        """Route, then take a worker slot by priority (server.priority); None when nothing is left to try.
        What fits at the current load comes first (the key's worker first, server.affinity); what fits
        only at a light load (predicted queueing breaks the budget) is for critical requests to wait
        for, a 503 for standard ones and a 429 for sheddable ones."""
        kw = dict(prompt_tokens=p, max_tokens=o, pinned=pinned, exclude=tried, allowed=grant.members, cached=self.affinity.cached(key, p))
        result = route(self.family, self.pool, budget, live=self.live, **kw)
        live = self.affinity.prefer(key, result.choices, self.admission.free)
        light = route(self.family, self.pool, budget, idle=True, **kw).choices if self.live and (priority != "standard" or not live) else live
        if not live and light and priority == "standard":
            if not budget.allow_best_effort:
                raise self.admission.refuse(priority, "predicted queueing past the budget on every member that fits it", "predicted_queueing")
            light = []
        if not live and not light:
            if budget.allow_best_effort:
                live = best_effort(self.family, self.pool, result, prompt_tokens=p, max_tokens=o, exclude=tried, live=self.live)
                live = [c for c in live if grant.within(c)]  # best effort never serves past the key's cap
            if not live:
                if not first_attempt:
                    return None
                err = no_fit_error(result, budget, pinned, prompt_param)
                self.metrics.rejections.labels(err.param or err.code or "none").inc()
                raise err
        admitted = await self.admission.admit(priority, live, light, budget, routed=pinned is None)
        admitted.last_choice = len(live or light) <= 1
        self.metrics.admitted.labels(priority, admitted.how).inc()
        self.affinity.remember(key, admitted.choice, p.get(admitted.choice.member.name, 0))
        return admitted

    async def handle(self, path: str, body: ChatCompletionRequest | CompletionRequest, budget: Budget, pinned: str | None,
                     grant: Grant = OPEN, chars: int = 0, ticket: Ticket = NO_QUOTA, trace: RequestTrace = NO_TRACE,
                     priority: Priority = "standard", key: AffinityKey | None = None) -> Response:
        arrived = time.perf_counter()
        members = [pinned] if pinned else [m.name for m in self.family.servable if grant.members is None or m.name in grant.members]
        p, o = await self.tokenizers.count_async(body, members, chars), body.resolved_max_tokens()
        if ticket.enabled:  # 429 over the key's token quota (server.quotas)
            await ticket.reserve(max(p.values(), default=0) + o)
        if trace.enabled:
            trace.set(prompt_tokens=max(p.values(), default=0), max_tokens=o, stream=body.stream, quota_reserved_tokens=ticket.reserved or None)
        prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        payload = body.upstream_payload()
        attempts = Attempts(self.pool, self.metrics)
        tried: set[str] = set()
        first_member: str | None = None
        retry_after: str | None = None  # from the last worker that answered 429
        stalled: FirstTokenTimeout | None = None  # the last attempt cancelled for no first token
        for attempt in range(MAX_ATTEMPTS):
            admitted = await self.admit(budget, pinned, p, o, tried, attempt == 0, prompt_param, grant, priority, key)
            if admitted is None:
                break
            choice = admitted.choice  # its worker slot is taken: released below or by the relay
            trace.attempt(choice)
            first_member = first_member or choice.member.name
            if choice.member.name != first_member:
                self.metrics.fallbacks.labels(first_member, choice.member.name).inc()
            self.metrics.routing.labels(choice.member.name, choice.reason).inc()
            w = choice.worker
            self.relay.enter(choice)
            tried.add(w.name)
            payload["model"] = choice.member.name
            start = time.perf_counter()
            deadline = first_token_deadline(budget, choice.predicted, self.first_token_s, admitted.last_choice) if body.stream else None
            # what is left of the caller's latency budget: the worker serves such requests first (server.deadline_scheduling)
            headers = with_deadline(trace.upstream_headers(w.headers), budget.max_latency_ms, budget.max_ttft_ms, start - arrived)
            released = False
            upstream: aiohttp.ClientResponse | None = None
            try:
                upstream = await by_deadline(deadline, start, self.pool.session.post(w.url(path), data=json.dumps(payload).encode(),
                                                                                     headers=headers, timeout=self.timeout))
                status = upstream.status
                if status >= 500 or status == 429:
                    content = await upstream.read()
                    if status == 429:
                        retry_after = upstream.headers.get("retry-after", "1")
                        self.metrics.retries.labels(w.name, "429").inc()
                    else:  # an answer, not an outage: no cooldown for it alone; the second one ends the request
                        self.metrics.retries.labels(w.name, "5xx").inc()
                        attempts.server_error(w, status, content, choice.member.name)
                    continue
                if status != 200:  # the worker's own 4xx: the caller's mistake, pass it on
                    content = await upstream.read()
                    self.metrics.requests.labels(choice.member.name, w.name, f"http_{status}").inc()
                    return Response(content, status_code=status, media_type="application/json", headers=route_headers(choice))
                attempts.served()
                if body.stream:
                    head, ttft = await by_deadline(deadline, start, self.relay.head(upstream, start))
                    released = True  # the relay owns the connection and the in-flight count from here
                    return StreamingResponse(self.relay.stream(upstream, head, ttft, choice, budget, start, ticket, trace, p.get(choice.member.name, 0)),
                                             media_type="text/event-stream", headers=route_headers(choice))
                content = await upstream.read()
                e2e = time.perf_counter() - start
                self.relay.observe_whole(choice, content, e2e, budget)
                trace.observed(None, e2e)
                if ticket.active:
                    ticket.used(total_tokens(content) or ticket.reserved)  # no usage reported: the worst case
                return Response(content, media_type="application/json", headers=route_headers(choice))
            except FirstTokenTimeout as exc:  # cancelled before any byte reached the client: next choice
                stalled = exc
                self.relay.stalled(choice, exc.deadline_s)
            except (*UPSTREAM_ERRORS, UpstreamEnded) as exc:
                self.pool.fail(w, type(exc).__name__)
                self.metrics.retries.labels(w.name, "connection").inc()
            finally:
                if not released:
                    if upstream is not None:
                        upstream.release()
                    self.relay.leave(choice)
        if stalled is not None:
            raise no_first_token_error(sorted(tried), stalled.deadline_s)
        if retry_after is not None:
            raise APIError(429, "every worker that fits is at capacity; retry shortly", type="rate_limit_error", code="overloaded",
                           headers={"Retry-After": retry_after})
        said = "".join(f"; {w.name} answered HTTP {status}: {msg}" for w, status, msg in attempts.failed)
        raise APIError(502, f"no upstream worker could serve the request after retries{said}", type="server_error", code="upstream_failed")



def create_app(family: Family, workers: list[WorkerSpec], *, auth: Auth | None = None, timeout: float = 120.0,
               health_interval: float = 2.0, live: bool = True, limits: Limits | None = None, state_backend: StateBackend | None = None,
               state_failure: FailurePolicy = "open", tracer_provider=None, policy: RoutingPolicy | None = None) -> FastAPI:
    """The gateway app. `state_backend`: where token quotas live (server.state: Redis shared by replicas, or this
    process's memory by default), with `state_failure` applied when it is unreachable (server.quotas);
    `tracer_provider`: an OpenTelemetry TracerProvider for one span per request (server.tracing), or None;
    `policy`: worker slots, queue waits, affinity and the default first-token deadline (server.priority)."""
    auth = auth or Auth()
    limits = limits or Limits.for_context(max((m.max_model_len for m in family.servable), default=2048))
    metrics = GatewayMetrics()
    tokenizers = Tokenizers(family)  # once, at start-up
    quotas = Quotas(state_backend, state_failure, metrics)
    tracing = Tracing(tracer_provider)
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        session = upstream_session()
        pool = Pool(workers, session, metrics, interval=health_interval)
        await pool.start()
        p = policy or RoutingPolicy()
        state["gateway"] = Gateway(family, pool, metrics, tokenizers, timeout, live, admission=p.admission(metrics),
                                   affinity=Affinity(metrics, p.affinity, p.affinity_max_extra_load), first_token_s=p.first_token_s)
        try:
            yield
        finally:
            await pool.stop()
            await session.close()
            await quotas.close()  # settlements in flight first
            tracing.shutdown()

    app = FastAPI(title=f"family gateway: {family.registry.name}", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, on_refuse=lambda code: metrics.refused.labels(code).inc())
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
        trace = tracing.start(path, request.headers)
        ticket = NO_QUOTA

        def settle() -> None:  # once the response is sent or abandoned: quota settlement, then the span ends
            ticket.finish()
            trace.set(quota_used_tokens=ticket.usage if ticket.active else None)
            trace.finish()

        on_finish(request.scope, settle)
        try:
            key = caller(request)
            trace.set(key=key.name if key is not None else None)
            auth.admit(key)
            pinned = pinned_member(body.model)
            grant = grant_for(key, family, pinned)  # 403: a member outside the key's list
            chars = check_prompt_chars(body, limits)  # 400 before tokenizing: cannot fit any member
            budget = grant.narrow(resolve_budget(body.budget, request, key))
            priority = resolve_priority(body.priority, request, key)  # 400 for a bad x-priority
            on_finish(request.scope, auth.acquire(key))  # 429 over the key's concurrency; freed when the response ends
            ticket = quotas.ticket(key)
        except APIError as exc:
            metrics.refused.labels(exc.code or str(exc.status_code)).inc()
            trace.status(exc.status_code, exc.code)
            raise
        try:
            response = await state["gateway"].handle(path, body, budget, pinned, grant, chars, ticket=ticket, trace=trace,
                                                     priority=priority, key=affinity_key(body, request))
        except APIError as exc:
            trace.status(exc.status_code, exc.code)
            metrics.goodput.labels(budget_class(budget), "failed").inc()  # refused or failed after its budget was known
            raise
        trace.status(response.status_code)
        return response

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
        data["unfit"] = family.unfit  # member → why routed traffic never reaches it
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
