"""The embedded torch worker: OpenAI-compatible, token-exact against transformers, safe under load."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.worker_torch import create_app
from tests.server.conftest import serve

PROMPTS = ["The tower is", "In 1905 the", "Rivers of the north", "She said that"]


@pytest.fixture(scope="module")
def worker(tiny_member_dir):
    app = create_app(tiny_member_dir, "tiny-p70", max_model_len=256, max_batch=8, max_waiting=4)
    with serve(app) as url:
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")


def _reference(member_dir, prompt_ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(member_dir, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_completions_equal_transformers_token_for_token(worker, tiny_member_dir):
    url, client = worker
    tok = AutoTokenizer.from_pretrained(tiny_member_dir)
    for prompt in PROMPTS:
        got = client.completions.create(model="tiny-p70", prompt=prompt, max_tokens=12, temperature=0)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ref = _reference(tiny_member_dir, ids, 12)
        eos = tok.eos_token_id
        ref = ref[: ref.index(eos)] if eos in ref else ref
        assert got.choices[0].text == tok.decode(ref, skip_special_tokens=True)
        assert got.usage.prompt_tokens == len(ids)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(worker):
    url, client = worker
    alone = {p: client.completions.create(model="tiny-p70", prompt=p, max_tokens=10, temperature=0).choices[0].text for p in PROMPTS}
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = dict(zip(PROMPTS, pool.map(
            lambda p: client.completions.create(model="tiny-p70", prompt=p, max_tokens=10, temperature=0).choices[0].text, PROMPTS
        )))
    assert together == alone


def test_chat_streaming_matches_non_streaming_and_reports_usage(worker):
    url, client = worker
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    whole = client.chat.completions.create(model="tiny-p70", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny-p70", messages=messages, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [whole.choices[0].finish_reason]


def test_streaming_completions_match_non_streaming(worker):
    url, client = worker
    whole = client.completions.create(model="tiny-p70", prompt="In 1905 the", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(
        model="tiny-p70", prompt="In 1905 the", max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(pieces) > 3  # token by token, not one blob at the end
    assert "".join(pieces) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage and not chunks[-1].choices
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == 20


def test_chat_usage_counts_the_templated_prompt(worker, tiny_member_dir):
    url, client = worker
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    got = client.chat.completions.create(model="tiny-p70", messages=messages, max_tokens=5, temperature=0)
    tok = AutoTokenizer.from_pretrained(tiny_member_dir)
    flat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = tok(tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].message.role == "assistant"


def test_a_request_arriving_mid_generation_joins_the_running_batch(worker):
    """Continuous batching: a short request sent while a long one decodes finishes first, and neither
    answer changes (the long one's cache is re-padded when the newcomer joins and trimmed when it leaves)."""
    url, client = worker
    long_kw = dict(model="tiny-p70", prompt="Rivers of the north", max_tokens=200, temperature=0, extra_body={"ignore_eos": True})
    short_kw = dict(model="tiny-p70", prompt="She said that the old tower", max_tokens=4, temperature=0)
    long_alone = client.completions.create(**long_kw).choices[0].text
    short_alone = client.completions.create(**short_kw).choices[0].text
    stream = client.completions.create(**long_kw, stream=True)
    received, short, running_after_short = [], None, None
    for chunk in stream:
        received.append(chunk.choices[0].text)
        if len(received) == 5:
            short = client.completions.create(**short_kw)
            running_after_short = _gauge(url, "vllm:num_requests_running")
    assert running_after_short == 1.0  # the long request was still decoding when the short one was answered
    assert short.choices[0].text == short_alone
    assert "".join(received) == long_alone


def test_stop_sequences_cut_the_output(worker):
    url, client = worker
    full = client.completions.create(model="tiny-p70", prompt="The tower is", max_tokens=24, temperature=0).choices[0].text
    stop = full[5:8]
    assert stop.strip()
    cut = client.completions.create(model="tiny-p70", prompt="The tower is", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_repeatable(worker):
    url, client = worker
    a = client.completions.create(model="tiny-p70", prompt="The", max_tokens=12, temperature=1.0, seed=7).choices[0].text
    b = client.completions.create(model="tiny-p70", prompt="The", max_tokens=12, temperature=1.0, seed=7).choices[0].text
    assert a == b


def test_metrics_use_vllm_names(worker):
    url, client = worker
    client.completions.create(model="tiny-p70", prompt="x", max_tokens=2)
    text = httpx.get(f"{url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds", "vllm:kv_cache_usage_perc",
                 "vllm:generation_tokens_total"):
        assert f'{name}' in text
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "other", "prompt": "x"}, 404, "model"),
        ({"model": "tiny-p70", "prompt": "x", "n": 3}, 400, "n"),
        ({"model": "tiny-p70", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny-p70", "prompt": "word " * 300}, 400, "prompt"),
        ({"prompt": "x"}, 400, "model"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(worker, body, status, param):
    url, _ = worker
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_malformed_json_is_a_400(worker):
    url, _ = worker
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_full_queue_answers_429_with_retry_after_not_a_timeout(worker):
    url, _ = worker
    body = {"model": "tiny-p70", "prompt": "The", "max_tokens": 200, "temperature": 0}
    with cf.ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=120), range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] and limited.json()["error"]["type"] == "rate_limit_error"
