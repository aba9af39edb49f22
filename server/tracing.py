"""OpenTelemetry traces for the gateway: one span per completion request, off by default.

Why spans on top of Prometheus: the metrics say how often and how slow; a span says, for one request,
which member and worker served it, after how many attempts, and how the latency the router predicted
compares with what was observed, and it joins the caller's own trace (W3C `traceparent` is read from
the request and passed on to the worker, which vLLM can continue with its own spans).

`family serve --otel console|otlp` (or `OTEL_TRACES_EXPORTER`): `console` prints each span as JSON on
stdout; `otlp` sends them over OTLP/HTTP to `OTEL_EXPORTER_OTLP_ENDPOINT` (the exporter's standard
variables: endpoint, headers, timeout). `none` (the default) sets up nothing: the request path then
calls only the no-op `NO_TRACE`.

The span (`POST /v1/chat/completions`, kind SERVER) carries:

| attribute | meaning |
|---|---|
| `family.member`, `family.worker`, `family.route` | who served it (the last attempt) and why (`best`, `pinned`, `best_effort`) |
| `family.attempts` | upstream attempts (1 when the first worker served it); an `attempt` event per attempt |
| `family.predicted_ttft_ms`, `family.predicted_latency_ms` | what the router predicted for the chosen worker |
| `family.observed_ttft_ms`, `family.observed_latency_ms` | what the gateway saw (TTFT for streams only) |
| `family.key`, `family.stream`, `family.prompt_tokens`, `family.max_tokens` | the caller's key name, the request's shape |
| `family.quota.reserved_tokens`, `family.quota.used_tokens` | its token-quota reservation and settlement (server.quotas) |
| `http.response.status_code`, `error.type` | the answer; errors also set the span's status to ERROR |
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from server.router import Choice

EXPORTERS = ("none", "console", "otlp")
SERVICE_NAME = "family-gateway"


def tracer_provider(exporter: str) -> "TracerProvider | None":
    """A provider exporting with `exporter` (none, console or otlp); None for none."""
    from family.errors import FamilyError

    if exporter not in EXPORTERS:
        raise FamilyError(f"--otel must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if exporter == "none":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME})
    provider = TracerProvider(resource=resource)
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise FamilyError("--otel otlp needs opentelemetry-exporter-otlp-proto-http") from exc
        span_exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(span_exporter))  # exported off the request path
    return provider


class Tracing:
    """Starts one RequestTrace per request from a provider (or NO_TRACE without one)."""

    def __init__(self, provider: "TracerProvider | None"):
        self.provider = provider
        self.tracer = None
        if provider is not None:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            self.tracer = provider.get_tracer("server.gateway")
            self.propagator = TraceContextTextMapPropagator()

    def start(self, path: str, headers) -> "RequestTrace":
        if self.tracer is None:
            return NO_TRACE
        from opentelemetry.trace import SpanKind

        parent = self.propagator.extract({k: v for k, v in headers.items() if k in ("traceparent", "tracestate")})
        span = self.tracer.start_span(f"POST {path}", context=parent, kind=SpanKind.SERVER,
                                      attributes={"http.request.method": "POST", "url.path": path})
        return RequestTrace(span, self.propagator)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes what the batch processor still holds


class RequestTrace:
    """One request's span: attributes set as the gateway learns them, ended once when the response is over."""

    enabled = True  # False only for NO_TRACE: the request path skips building attributes for nobody

    def __init__(self, span, propagator):
        self.span, self.propagator = span, propagator
        self.attempts = 0
        self.ended = False

    def set(self, **attributes) -> None:
        """Set `family.<name>` attributes (None values are left out)."""
        for k, v in attributes.items():
            if v is not None:
                self.span.set_attribute(f"family.{k}", v)

    def attempt(self, choice: "Choice") -> None:
        self.attempts += 1
        pred = choice.predicted
        attrs = {"member": choice.member.name, "worker": choice.worker.name, "route": choice.reason, "attempts": self.attempts,
                 "predicted_ttft_ms": round(pred.ttft_s * 1e3, 2) if pred else None,
                 "predicted_latency_ms": round(pred.e2e_s * 1e3, 2) if pred else None}
        self.set(**attrs)
        self.span.add_event("attempt", {f"family.{k}": v for k, v in attrs.items() if v is not None})

    def upstream_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """The worker's headers plus this span's `traceparent`, so the worker's spans join the trace."""
        from opentelemetry.trace import set_span_in_context

        out = dict(headers)
        self.propagator.inject(out, context=set_span_in_context(self.span))
        return out

    def observed(self, ttft_s: float | None, e2e_s: float) -> None:
        self.set(observed_ttft_ms=round(ttft_s * 1e3, 2) if ttft_s is not None else None, observed_latency_ms=round(e2e_s * 1e3, 2))

    def status(self, code: int, error: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attribute("http.response.status_code", code)
        if code >= 400 or error:
            self.span.set_attribute("error.type", error or str(code))
            if code >= 500 or error:
                self.span.set_status(Status(StatusCode.ERROR, error or str(code)))

    def finish(self) -> None:
        if not self.ended:
            self.ended = True
            self.span.end()


class _NoTrace(RequestTrace):
    """Tracing off: every call does nothing (the request path pays one method call per hook)."""

    enabled = False

    def __init__(self):
        self.attempts, self.ended = 0, True

    def set(self, **attributes) -> None:
        pass

    def attempt(self, choice) -> None:
        pass

    def upstream_headers(self, headers: dict[str, str]) -> dict[str, str]:
        return headers

    def observed(self, ttft_s, e2e_s) -> None:
        pass

    def status(self, code: int, error: str | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


NO_TRACE = _NoTrace()
