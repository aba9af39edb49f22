"""Deadline-first scheduling (server.deadline_scheduling): requests with a latency budget go first in the
torch engine, work without one is held back a bounded time, and the router predicts accordingly.

The policy is pure functions, specified here on plain records; one test runs it in a real engine
serving two tiny members over HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from server.deadline_scheduling import (
    HEADER,
    MAX_DEFER_S,
    admissible,
    admit_order,
    parse_deadline_ms,
    partition,
    pressing,
    pressing_first,
    steps,
    with_deadline,
)
from server.worker_torch import create_app
from tests.server.conftest import serve


@dataclass
class Req:
    deadline: float | None = None
    arrived: float = 0.0
    last_token_at: float = 0.0
    max_tokens: int = 10
    output_ids: list[int] = field(default_factory=list)


@pytest.mark.parametrize("value, seconds", [("1500", 1.5), ("0", 0.0), ("12.5", 0.0125), (None, None), ("-1", None),
                                            ("soon", None), ("nan", None), ("inf", None)])
def test_the_header_is_a_hint_a_malformed_one_is_ignored(value, seconds):
    assert parse_deadline_ms(value) == seconds


def test_the_gateway_sends_what_is_left_of_the_latency_budget():
    base = {"content-type": "application/json"}
    assert with_deadline(base, 2000, 500, 0.3) == {**base, HEADER: "1700"}  # the whole answer's limit first
    assert with_deadline(base, None, 500, 0.1) == {**base, HEADER: "400"}  # else the first token's
    assert with_deadline(base, 100, None, 0.5)[HEADER] == "0"  # spent already: as urgent as it gets, never negative
    assert with_deadline(base, None, None, 0.1) is base  # no latency budget: nothing added


def test_a_deadline_is_pressing_when_the_remaining_tokens_would_miss_it_at_the_rounds_pace():
    r = Req(deadline=11.0, max_tokens=10, output_ids=[1, 2])  # 8 tokens to go, 1 s left
    assert not pressing(r, now=10.0, pace_s=0.1) and pressing(r, now=10.0, pace_s=0.2)
    assert pressing(Req(deadline=11.0), now=11.5, pace_s=0.0)  # already late
    assert not pressing(Req(), now=10.0, pace_s=10.0)  # no deadline, never pressing


def test_with_nothing_pressing_every_member_with_work_steps_round_robin():
    loose = Req(deadline=1000.0)  # a loose budget holds no one back
    assert steps([Req()], [], urgent=False, now=10.0, pace_s=0.05) and steps([], [Req(arrived=9.99)], urgent=False, now=10.0, pace_s=0.05)
    assert steps([loose], [], urgent=False, now=10.0, pace_s=0.05)
    assert not steps([], [], urgent=False, now=10.0, pace_s=0.05)


def test_while_a_request_is_pressing_members_without_one_wait_up_to_the_bound():
    now, pace = 100.0, 0.05
    recent = Req(arrived=90.0, last_token_at=now - MAX_DEFER_S / 2)
    assert not steps([recent], [], urgent=True, now=now, pace_s=pace)  # held back: its last token was recent
    assert steps([Req(arrived=90.0, last_token_at=now - MAX_DEFER_S)], [], urgent=True, now=now, pace_s=pace)  # held long enough
    assert steps([], [Req(arrived=now - 2 * MAX_DEFER_S)], urgent=True, now=now, pace_s=pace)  # a prompt that waited long enough
    assert not steps([], [Req(arrived=now - 0.01)], urgent=True, now=now, pace_s=pace)
    loose = Req(deadline=now + 60, arrived=90.0, last_token_at=recent.last_token_at)
    assert not steps([recent, loose], [], urgent=True, now=now, pace_s=pace)  # its deadline is not pressing
    assert steps([recent], [Req(deadline=now + 0.1, arrived=now)], urgent=True, now=now, pace_s=pace)  # a pressing one of its own
    assert not steps([recent], [], urgent=True, now=now, pace_s=pace, max_defer_s=10.0)
    assert steps([recent], [], urgent=True, now=now, pace_s=pace, max_defer_s=0.0)


def test_a_step_decodes_only_the_pressing_rows_brought_to_the_front_until_another_row_waited_long_enough():
    now, pace = 100.0, 0.1
    hot = lambda: Req(deadline=now + 0.5, last_token_at=now)  # noqa: E731  10 tokens in 0.5 s at 0.1 s a token: pressing
    cold = lambda waited=0.0: Req(last_token_at=now - waited)  # noqa: E731
    rows = [cold(), hot(), cold(), hot()]
    assert pressing_first(rows, now, pace) == 2
    first, third = rows[1], rows[3]
    assert partition(rows, now, pace) == [(0, 1), (1, 3)] and rows[:2] == [first, third]
    assert partition(rows, now, pace) == []  # already in front
    assert pressing_first([cold(), hot(), cold(MAX_DEFER_S)], now, pace) == 3  # one waited long enough: all step
    assert pressing_first([cold(), cold()], now, pace) == 2 and pressing_first([hot(), hot()], now, pace) == 2


def test_admission_is_earliest_deadline_first_and_other_prompts_wait_for_pressing_rows():
    a, b, c, d = Req(arrived=1.0), Req(deadline=9.0, arrived=2.0), Req(deadline=5.0, arrived=3.0), Req(arrived=0.5)
    assert admit_order([a, b, c, d]) == [c, b, d, a]
    assert admissible(b, rows_pressing=True, now=8.5, pace_s=0.1)  # pressing: 10 tokens in 0.5 s at 0.1 s a token
    assert not admissible(b, rows_pressing=True, now=2.0, pace_s=0.1)  # 7 s for 10 tokens: it can wait like the rest
    assert not admissible(a, rows_pressing=True, now=1.0 + MAX_DEFER_S / 2, pace_s=0.1)
    assert admissible(a, rows_pressing=True, now=1.0 + MAX_DEFER_S, pace_s=0.1) and admissible(a, rows_pressing=False, now=1.0, pace_s=0.1)


def _parent_tokens(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('vllm:inter_token_latency_seconds_count{model_name="tiny-parent"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_member_holding_a_pressing_request_has_the_engine_to_itself(tiny_parent_dir, tiny_member_dir):
    """tiny-parent decodes a long stream with no latency budget; a request for tiny-p70 arrives. Without a
    deadline, or with one it meets anyway, the two members take turns, one step each per round; with one
    it would miss at that pace, tiny-parent is held back (here up to 5 s, so that a slow machine cannot
    blur it) and resumes once tiny-p70 is done."""
    app = create_app({"tiny-parent": tiny_parent_dir, "tiny-p70": tiny_member_dir}, max_model_len=4096, max_batch=4)
    app.state.engine.max_defer_s = 5.0
    with serve(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        long = client.completions.create(model="tiny-parent", prompt="a", max_tokens=4000, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
        stop = threading.Event()

        def drain() -> None:  # keep reading (the stream decodes throughout), then close it from this thread
            for _ in long:
                if stop.is_set():
                    break
            long.close()

        with cf.ThreadPoolExecutor(1) as pool:
            drained = pool.submit(drain)
            during = {}
            for label, headers in (("plain", {}), ("loose", {HEADER: "600000"}), ("pressing", {HEADER: "1"})):
                before = _parent_tokens(url)
                out = client.completions.create(model="tiny-p70", prompt="Rivers of the north", max_tokens=300, temperature=0,
                                                extra_body={"ignore_eos": True}, extra_headers=headers)
                during[label] = _parent_tokens(url) - before
                assert out.usage.completion_tokens == 300
            stop.set()
            drained.result(timeout=60)
        # Plain, or a deadline ten minutes away: one parent step per round, for each of the 300 tokens. A
        # deadline it would miss at that pace: only while the request was on its way through HTTP (a tiny
        # model's step is about a millisecond).
        assert during["plain"] >= 250 and during["loose"] >= 250
        assert during["pressing"] <= during["plain"] / 4


def test_the_gateway_passes_a_latency_budget_to_the_worker_as_a_deadline(tmp_path):
    """Through the gateway to a real worker: a routed request with `max_latency_ms` reaches the engine with
    a deadline that far ahead (less what the gateway spent), one without a latency budget with none. On a
    worker that schedules by deadline, the gateway counts such requests while they run (the router
    predicts the next one by that count) and forgets them when they end."""
    from family.registry import load_family
    from loadtests.tinyfamily import build_tiny_family
    from server.fleet import WorkerSpec
    from server.gateway import create_app as create_gateway

    fam = load_family(build_tiny_family(tmp_path / "fam", "test-cpu"))
    worker = create_app(fam.member_dir("tiny-p60"), "tiny-p60", max_model_len=256, max_batch=4)
    engine, seen, counted, gateway = worker.state.engine, [], [], []
    submit = engine.submit

    def first_in_flight() -> int:
        return httpx.get(f"{gateway[0]}/v1/family", timeout=10).json()["workers"][0]["first_in_flight"]

    def recording(member, req):
        seen.append(None if req.deadline is None else req.deadline - req.arrived)
        counted.append(first_in_flight())
        return submit(member, req)

    engine.submit = recording
    spec = WorkerSpec(url="http://127.0.0.1:1", member="tiny-p60", device_class="test-cpu", deadline_scheduling=True)
    with serve(worker) as url, serve(create_gateway(fam, [spec.model_copy(update={"url": url})], health_interval=0.3)) as gw:
        gateway.append(gw)
        client = openai.OpenAI(base_url=f"{gw}/v1", api_key="none", max_retries=0)
        for budget in ({"max_latency_ms": 60000}, {"max_ttft_ms": 30000}, {}):
            client.completions.create(model="tiny-p60", prompt="Rivers", max_tokens=4, extra_body={"budget": budget} if budget else None)
        after = first_in_flight()
    assert 59.0 < seen[0] <= 60.0 and 29.0 < seen[1] <= 30.0 and seen[2] is None
    assert counted == [1, 1, 0] and after == 0


def test_pressing_rows_decode_alone_and_every_row_keeps_its_own_tokens(tiny_member_dir):
    """One member, two long greedy streams without a deadline, then a request that would miss its
    deadline at their pace: it decodes in a batch of its own (its cache swapped to the front), the other
    rows wait (here up to 5 s), and every request's text is still exactly transformers' greedy text."""
    from tests.server.test_engine_multi import _greedy

    app = create_app(tiny_member_dir, "tiny-p70", max_model_len=2048, max_batch=4)
    app.state.engine.max_defer_s = 5.0
    kw = dict(temperature=0, extra_body={"ignore_eos": True})

    def tokens_so_far(url: str) -> float:
        for line in httpx.get(f"{url}/metrics").text.splitlines():
            if line.startswith('vllm:inter_token_latency_seconds_count{model_name="tiny-p70"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    with serve(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        with cf.ThreadPoolExecutor(2) as pool:
            plain = [pool.submit(client.completions.create, model="tiny-p70", prompt=p, max_tokens=1500, **kw)
                     for p in ("The tower is", "In 1905 the")]
            deadline = time.monotonic() + 60
            while app.state.engine.members["tiny-p70"].stats.running < 2:
                assert time.monotonic() < deadline and not any(f.done() for f in plain), "the two streams never ran together"
                time.sleep(0.001)
            before = tokens_so_far(url)
            hot = client.completions.create(model="tiny-p70", prompt="Rivers of the north", max_tokens=300, extra_headers={HEADER: "1"}, **kw)
            during = tokens_so_far(url) - before
            texts = [f.result(timeout=120).choices[0].text for f in plain]
    assert hot.choices[0].text == _greedy(tiny_member_dir, "Rivers of the north", 300)
    assert texts == [_greedy(tiny_member_dir, p, 1500) for p in ("The tower is", "In 1905 the")]
    # Its 299 steps alone, and the others' only while it was on its way through HTTP (a tiny model's step
    # is about a millisecond); in the batch with them it would have been three tokens a step, ~900.
    assert during < 1.5 * 300
