"""The gateway's Prometheus metrics (its own registry, so several apps can live in one process).

deploy/grafana/dashboards/family-gateway.json charts them (tests/server/test_dashboard.py checks that
every metric it queries exists here).

Why the children are cached: prometheus_client's `labels()` validates its arguments, builds a key and
takes a lock on every call (a few microseconds), and the request path calls it about ten times per
request with a handful of label combinations; a dict lookup gives the same child
(benchmarks/gateway_overhead.py)."""

from __future__ import annotations

import prometheus_client

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class _CachedLabels:
    """`labels()` that returns the child it returned before for the same values (children are never removed)."""

    def labels(self, *values, **named):
        key = values if not named else tuple(sorted(named.items()))
        cache = self.__dict__.get("_children")
        if cache is None:
            cache = self.__dict__["_children"] = {}
        child = cache.get(key)
        if child is None:
            child = cache[key] = super().labels(*values, **named)
        return child


class Counter(_CachedLabels, prometheus_client.Counter):
    pass


class Gauge(_CachedLabels, prometheus_client.Gauge):
    pass


class Histogram(_CachedLabels, prometheus_client.Histogram):
    pass


CollectorRegistry = prometheus_client.CollectorRegistry


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("family_requests", "Requests by member, worker and outcome", ["member", "worker", "outcome"], registry=r)
        self.ttft = Histogram("family_time_to_first_token_seconds", "Time to first token seen by the gateway", ["member"], buckets=BUCKETS, registry=r)
        self.itl = Histogram("family_inter_token_latency_seconds", "Gap between streamed chunks", ["member"], buckets=BUCKETS, registry=r)
        self.e2e = Histogram("family_e2e_request_latency_seconds", "Request latency seen by the gateway", ["member"], buckets=BUCKETS, registry=r)
        self.budget_misses = Counter("family_budget_misses", "Finished requests that exceeded their own budget", ["member", "constraint"], registry=r)
        self.routing = Counter("family_routing_decisions", "Routing decisions by member and reason", ["member", "reason"], registry=r)
        self.rejections = Counter("family_budget_rejections", "Requests no member could serve within budget", ["constraint"], registry=r)
        self.retries = Counter("family_retries", "Upstream attempts retried on another worker", ["worker", "reason"], registry=r)
        self.fallbacks = Counter("family_fallbacks", "Requests served by a member other than the first choice", ["from_member", "to_member"], registry=r)
        self.worker_up = Gauge("family_worker_healthy", "1 if the worker passes health checks", ["worker", "member"], registry=r)
        self.poison = Counter("family_poison_requests", "Requests that got an HTTP 5xx from two workers: answered 400 as the likely "
                              "cause, no worker cooled down", ["member"], registry=r)
        self.strikes = Counter("family_worker_strikes", "HTTP 5xx to a request that another worker then served", ["worker"], registry=r)
        self.refused = Counter("family_refused_requests", "Requests refused at the edge before any work (by error code)", ["code"], registry=r)
        self.in_flight = Gauge("family_worker_in_flight", "Requests the gateway has in flight to the worker, per member it serves", ["worker", "member"], registry=r)
        # Issue 12: priorities and admission (server.priority), affinity (server.affinity), deadlines (server.deadlines).
        self.admitted = Counter("family_admitted", "Requests given a worker slot, by priority and how (free, queued, downshift)",
                                ["priority", "how"], registry=r)
        self.downshifts = Counter("family_downshifts", "Sheddable requests moved to a smaller member because the best was saturated",
                                  ["from_member", "to_member"], registry=r)
        self.sheds = Counter("family_sheds", "Sheddable requests refused under load (429 with Retry-After), by reason", ["reason"], registry=r)
        self.overloaded = Counter("family_overloaded", "Critical/standard requests refused under load (503 with Retry-After)",
                                  ["priority", "reason"], registry=r)
        self.queued = Gauge("family_queue_waiting", "Requests waiting in the gateway's queue for a worker slot", registry=r)
        self.queue_wait = Histogram("family_queue_wait_seconds", "Time a request waited for a worker slot", ["priority"], buckets=BUCKETS,
                                    registry=r)
        self.affinity = Counter("family_affinity", "Requests with an affinity key: hit (its worker), load_guard (its worker too "
                                "busy), new (no worker yet), unfit (its worker no longer fits)", ["result"], registry=r)
        self.deadline_cancels = Counter("family_first_token_deadline_cancels", "Attempts cancelled for no first token by their "
                                        "deadline (retried on the next choice)", ["worker"], registry=r)
        self.quota = Counter("family_quota_decisions", "Token-quota reservations per key: reserved, over_tokens_per_minute, "
                             "over_daily_tokens, state_unavailable_open, state_unavailable_closed", ["key", "decision"], registry=r)
        self.state_errors = Counter("family_state_errors", "Calls to the shared state store (Redis) that failed", ["op"], registry=r)
        self.goodput = Counter("family_goodput_requests", "Requests by budget class (budget_class()) and outcome: met (served within "
                               "its budget), missed (served past it), failed (not served, or a stream that broke)",
                               ["budget_class", "outcome"], registry=r)


def budget_class(budget) -> str:
    """A request's budget class for goodput: the kinds of limit it carries, "latency+memory+accuracy" to "none"
    (at most 8 label values, whatever the limits' numbers)."""
    kinds = []
    if budget.max_ttft_ms is not None or budget.max_latency_ms is not None or getattr(budget, "max_tpot_ms", None) is not None:
        kinds.append("latency")
    if budget.max_memory_gb is not None:
        kinds.append("memory")
    if budget.min_accuracy is not None:
        kinds.append("accuracy")
    return "+".join(kinds) or "none"
