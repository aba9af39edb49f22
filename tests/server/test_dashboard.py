"""The Grafana dashboard and the goodput metric it leads with (issue 12, item 5): every metric the
dashboard queries is one the gateway exports, and goodput per budget class is counted through real HTTP
(met, missed, failed). The deploy files parse and wire Prometheus and Grafana to that dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import GatewayMetrics
from tests.server.gateway_fixtures import fleet, tiny_family  # noqa: F401  (fixture)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "family-gateway.json"


def exported_names() -> set[str]:
    """Every sample name the gateway's registry can export (counters' _total, histograms' _bucket, ...)."""
    names = set()
    for family in GatewayMetrics().registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"]]
    return exprs


def test_every_metric_on_the_dashboard_is_exported():
    exprs = dashboard_exprs()
    used = {m for e in exprs for m in re.findall(r"\bfamily_[a-z0-9_]+", e)}
    assert len(exprs) >= 20 and {"family_goodput_requests_total", "family_routing_decisions_total", "family_fallbacks_total",
                                 "family_worker_healthy"} <= used
    missing = used - exported_names()
    assert not missing, f"the dashboard queries metrics the gateway does not export: {sorted(missing)}"


def test_the_compose_example_wires_prometheus_and_grafana_to_the_dashboard():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    gateways = [n for n, s in services.items() if "serve" in (s.get("command") or [])]
    assert len(gateways) >= 2 and sorted(t.split(":")[0] for t in targets) == sorted(gateways)
    for name in gateways:  # replicas share quota state through the compose Redis
        cmd = services[name]["command"]
        assert cmd[cmd.index("--state") + 1].startswith("redis://redis:") and "redis" in services
    mounts = {v["target"]: DEPLOY / v["source"] for v in services["grafana"]["volumes"]}
    assert (mounts["/var/lib/grafana/dashboards"] / DASHBOARD.name).is_file()
    provisioning = mounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["uid"] == json.loads(DASHBOARD.read_text())["panels"][1]["datasource"]["uid"]
    provider = yaml.safe_load((provisioning / "dashboards" / "family.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))  # loopback only


def _goodput(url: str) -> dict[tuple[str, str], float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if fam.name == "family_goodput_requests":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["budget_class"], s.labels["outcome"])] = s.value
    return out


def test_goodput_per_budget_class_through_real_http(tiny_family):
    with fleet(tiny_family, {"tiny-p100": 1, "tiny-p80": 1, "tiny-p60": 1}, live=False) as (url, client, _):
        def ask(budget: dict, stream: bool = False):
            return client.completions.create(model="tiny", prompt="a", max_tokens=2, stream=stream, extra_body={"budget": budget})

        ask({"max_latency_ms": 60_000})
        list(ask({"max_latency_ms": 60_000}, stream=True))
        ask({"max_memory_gb": 100, "min_accuracy": 0.5})
        client.completions.create(model="tiny", prompt="a", max_tokens=2)
        ask({"max_latency_ms": 1, "allow_best_effort": True})  # served by best effort, past its budget
        try:
            ask({"max_ttft_ms": 1})  # nothing fits: 422
        except Exception as exc:  # noqa: BLE001
            assert getattr(exc, "status_code", None) == 422
        assert _goodput(url) == {("latency", "met"): 2, ("memory+accuracy", "met"): 1, ("none", "met"): 1,
                                 ("latency", "missed"): 1, ("latency", "failed"): 1}
