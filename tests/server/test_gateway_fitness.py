"""An unfit member (issue 10) through real HTTP: routed traffic never reaches it, whatever the budget;
named in `model` it still answers, with an `x-family-warning` header. Two real torch workers on a copy
of the tiny family in which tiny-p80 (the member these budgets would pick) is marked unfit."""

from __future__ import annotations

import shutil

import httpx
import pytest

from family.registry import AccuracyRecord, load_family
from loadtests.budgets import Figures
from tests.server.gateway_fixtures import fleet, tiny_family  # noqa: F401  (fixture)

UNFIT = "tiny-p80"
WARNING = f"member {UNFIT} is unfit: 50% degenerate chat answers of 8 prompts (max 0%)"


@pytest.fixture(scope="module")
def gateway(tiny_family, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("unfit") / "family"
    shutil.copytree(tiny_family, root)
    load_family(root).record(UNFIT, accuracy=[AccuracyRecord(metric="degenerate_answers", value=0.5, data="chat prompts", tokens=8)])
    # No parent worker: with it, the empty budget would go to the parent and prove nothing.
    with fleet(root, {"tiny-p80": 1, "tiny-p60": 1}, live=False) as g:
        yield g


# Without the mark, tiny-p80 wins each of these: ttft 150 ms ≤ 300; chat agreement 0.9 ≥ 0.8; the parent
# (the best member) has no worker. Best effort for min_accuracy 0.8 would also pick it (it fits).
BUDGETS = [{"max_ttft_ms": 300}, {}, {"min_accuracy": 0.8, "allow_best_effort": True}, {"max_latency_ms": 5000}, {"max_memory_gb": 100}]


def test_routed_requests_never_reach_an_unfit_member(gateway):
    url, _, _ = gateway
    served = []
    for i in range(10):
        body = {"model": "tiny", "prompt": "a", "max_tokens": 2, "budget": BUDGETS[i % len(BUDGETS)], "stream": i % 3 == 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert "x-family-warning" not in r.headers
        served.append(r.headers["x-family-member"])
    assert set(served) == {"tiny-p60"}


def test_a_budget_only_the_unfit_member_meets_is_a_422_that_names_it(gateway):
    url, _, _ = gateway
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2, "budget": {"min_accuracy": 0.8}})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] == "budget.min_accuracy" and f"never routed to: {UNFIT}" in err["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_pinned_to_the_unfit_member_is_served_with_a_warning(gateway, stream):
    url, _, _ = gateway
    body = {"model": UNFIT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": stream}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-family-member"] == UNFIT and r.headers["x-family-route"] == "pinned"
    assert r.headers["x-family-warning"] == WARNING
    fit = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "tiny-p60"}, timeout=60)
    assert fit.status_code == 200 and "x-family-warning" not in fit.headers


def test_the_family_endpoint_lists_unfit_members_and_load_tests_still_read_it(gateway):
    url, _, _ = gateway
    data = httpx.get(f"{url}/v1/family").json()
    assert data["unfit"] == {UNFIT: WARNING.split(": ", 1)[1]}
    assert data["fitness"] == {"min_chat_agreement": 0.5, "max_degenerate": 0.0}
    fig = Figures.from_family_json(data)  # the load tests' static baseline reads the same policy
    assert fig.registry.member(UNFIT).unfit_reason(fig.registry.fitness) == data["unfit"][UNFIT]
