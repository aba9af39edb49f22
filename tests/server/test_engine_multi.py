"""One torch worker serving several members (issue 11): correct tokens for each, at once, over real HTTP
with the official client; a member it does not hold is a 404 in OpenAI's shape; the gateway routes
around the shared worker when its process is killed. And the decode path's layouts (stacked, merged
back to dense, factored at a padded rank; on each matmul kernel) and its slot compaction give
transformers' greedy tokens, and in bf16 transformers' logits."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import signal
import time
from dataclasses import replace

import aiohttp
import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from family.profile import WorkerProcess
from family.registry import load_family
from server.decoder import StaticDecoder, pairs_side_by_side, rotate, rotation_of
from server.engine_torch import TorchEngine
from server.fleet import WorkerSpec
from server.gateway import create_app as create_gateway
from server.kernels import KERNELS, PACK_BATCH, runnable_kernels
from server.layout import HEADS, Form, Layout, plan_layout, streamed_matvec
from server.metrics import GatewayMetrics
from server.pool import Pool
from server.worker_torch import create_app
from tests.server.conftest import serve
from tests.server.gateway_fixtures import DEVICE, tiny_family  # noqa: F401  (fixture)

PROMPTS = ["The tower is", "In 1905 the", "Rivers of the north"]


@pytest.fixture(scope="module")
def shared(tiny_parent_dir, tiny_member_dir):
    app = create_app({"tiny-parent": tiny_parent_dir, "tiny-p70": tiny_member_dir}, max_model_len=2048, max_batch=4)
    with serve(app) as url:
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def _greedy(member_dir, prompt: str, n: int) -> str:
    """transformers' own greedy continuation of `prompt` (to eos or n tokens), as text."""
    tok = AutoTokenizer.from_pretrained(member_dir)
    model = AutoModelForCausalLM.from_pretrained(member_dir, dtype=torch.float32).eval()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    out = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
    return tok.decode(out, skip_special_tokens=True)


def _running(url: str) -> dict[str, float]:
    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("vllm:num_requests_running{")]
    return {line.split('model_name="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in lines}


def _decoding_stream(client: openai.OpenAI, member: str):
    """A long stream on `member`, read until the engine is surely decoding it: the first chunk is sent
    before the engine admits the request, so read past it into generated tokens. Long enough to still be
    decoding while a test looks at the load, even on a slow machine; closing it cancels the rest."""
    stream = client.completions.create(model=member, prompt="a", max_tokens=2000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for _ in range(4):
        next(stream)
    return stream


def test_two_members_at_once_each_answer_like_transformers(shared, tiny_parent_dir, tiny_member_dir):
    url, client = shared
    dirs = {"tiny-parent": tiny_parent_dir, "tiny-p70": tiny_member_dir}
    jobs = [(m, p) for m in dirs for p in PROMPTS]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=16, temperature=0), jobs))
    for (member, prompt), out in zip(jobs, got):
        assert out.model == member
        assert out.choices[0].text == _greedy(dirs[member], prompt, 16), (member, prompt)
    assert [m.id for m in client.models.list().data] == ["tiny-parent", "tiny-p70"]


def test_both_members_decode_in_the_same_engine_at_the_same_time(shared):
    """Two long streams, one per member, overlap: both rows are running together, and each stream's text
    is what it is alone."""
    url, client = shared
    kw = dict(prompt="Rivers of the north", max_tokens=120, temperature=0, extra_body={"ignore_eos": True})
    alone = {m: client.completions.create(model=m, **kw).choices[0].text for m in ("tiny-parent", "tiny-p70")}
    a = client.completions.create(model="tiny-parent", stream=True, **kw)
    text_a = [next(a).choices[0].text for _ in range(4)]
    b = client.completions.create(model="tiny-p70", stream=True, **kw)
    text_b = [next(b).choices[0].text for _ in range(4)]
    both = _running(url)
    text_a += [c.choices[0].text for c in a]
    text_b += [c.choices[0].text for c in b]
    assert both == {"tiny-parent": 1.0, "tiny-p70": 1.0}
    assert "".join(text_a) == alone["tiny-parent"] and "".join(text_b) == alone["tiny-p70"]


def test_the_gateway_pool_reads_each_members_load_from_the_shared_worker(shared):
    """One stream busy on tiny-parent: the pool's state for tiny-parent at that url shows it running, the
    state for tiny-p70 at the same url shows nothing (load is per member within the worker)."""
    url, client = shared
    specs = [WorkerSpec(url=url, member=m, device_class="cpu") for m in ("tiny-parent", "tiny-p70")]
    stream = _decoding_stream(client, "tiny-parent")

    async def check() -> dict[str, float]:
        async with aiohttp.ClientSession() as session:
            pool = Pool(specs, session, GatewayMetrics())
            for _ in range(10):  # a check times out after 2 s: on a loaded machine, try again
                await pool.check_all()
                if all(w.failed_checks == 0 for w in pool.workers):
                    break
            return {w.spec.member: w.running for w in pool.workers if w.failed_checks == 0}

    loads = asyncio.run(check())
    stream.close()
    assert loads == {"tiny-parent": 1.0, "tiny-p70": 0.0}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_member_the_worker_does_not_hold_is_a_404_in_openai_shape(shared, path):
    url, client = shared
    body = {"model": "tiny-p50", "prompt": "x"} if "chat" not in path else {"model": "tiny-p50", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{url}{path}", json=body)
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == "model" and "tiny-p50" in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-p50", prompt="x", max_tokens=2)


def test_health_records_how_each_member_is_served(shared):
    url, _ = shared
    serving = httpx.get(f"{url}/health").json()["serving"]
    assert set(serving) == {"tiny-parent", "tiny-p70"}
    assert serving["tiny-parent"]["projections"] == {"dense": 14}  # a dense parent has nothing to choose
    assert sum(serving["tiny-p70"]["projections"].values()) == 14 and serving["tiny-p70"]["how"] == "measured"
    assert serving["tiny-p70"]["timings_us"]  # the factored shapes were timed, each form
    for record in serving.values():  # the matmul kernel was chosen by timing aten (and oneDNN where it runs) at batch 1 and 16
        assert record["kernel"] in KERNELS and record["kernel"] in record["kernel_timings_us"]
        assert set(record["kernel_timings_us"]["aten"]) == {"1", str(PACK_BATCH)}
        assert record["head"] in HEADS and set(record["head_timings_us"]) == set(HEADS)
        assert record["head_batch1"] in (record["head"], "streamed")  # one row: the batch form, or streamed where faster


def test_a_member_that_cannot_load_fails_the_engine_at_construction_with_its_own_error(tiny_parent_dir, tmp_path):
    # Members load on the engine's own thread; a broken one must still surface in the caller, not hang it.
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="not a valid JSON file"):
        TorchEngine({"tiny-parent": tiny_parent_dir, "broken": tmp_path})


def _reference_ids(model, prompt: list[int], n: int) -> list[int]:
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()


def _mixed_at_odd_ranks(model) -> Layout:
    """A layout a measured plan may choose: per layer one of q / k factored at an odd rank, the rest
    dense. The dense q or k is then a view into the stacked output at an odd offset or row stride (CI
    met this on a tiny family at float32: "Tensor must have a stride divisible by 2")."""
    factored = plan_layout(model, "float32", "factored").forms
    odd = {f"model.layers.{i}.self_attn.{'q_proj' if i % 2 == 0 else 'k_proj'}" for i in range(model.config.num_hidden_layers)}
    return Layout(torch.float32, {p: Form("factored", f.rank | 1) if p in odd else Form("dense") for p, f in factored.items()},
                  how="test")


def test_every_layout_and_slot_compaction_keep_transformers_greedy_tokens(tiny_member_dir):
    """Factor pairs (stacked A's), merged dense, factored at a padded rank, dense and factored at odd
    ranks mixed in one stage, each on every matmul kernel that runs here and with either form of the LM
    head's product: the same greedy tokens. Row 0 finishes after 5 tokens and row 2 moves into its
    slot: both remaining rows stay exact."""
    model = AutoModelForCausalLM.from_pretrained(tiny_member_dir, dtype=torch.float32).eval()
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27]]
    refs = [_reference_ids(model, p, 16) for p in prompts]
    factored = plan_layout(model, "float32", "factored")
    padded = Layout(torch.float32, {p: Form("factored", f.rank + 3) for p, f in factored.forms.items()}, how="test")
    assert factored.forms and all(f.kind == "factored" for f in factored.forms.values())
    layouts = (factored, plan_layout(model, "float32", "dense"), padded, _mixed_at_odd_ranks(model))
    heads = [(h, h) for h in HEADS] + ([("linear", "streamed")] if streamed_matvec() is not None else [])  # (batch form, one-row form)
    for layout in [replace(lay, kernel=k, head=h, head_batch1=h1) for lay in layouts for k in runnable_kernels(torch.float32)
                   for h, h1 in heads]:
        dec = StaticDecoder(model, layout, max_slots=4, max_len=64, min_width=8)  # small width: the cache grows mid-run
        tokens = dec.prefill(0, prompts).argmax(-1)
        got = [[int(t)] for t in tokens]
        rows, positions = [0, 1, 2], torch.tensor([len(p) for p in prompts])
        for step in range(15):
            if step == 4:  # row 0 is done: the last row moves into its slot
                dec.move(2, 0, int(positions[2]))
                rows, tokens, positions = [2, 1], tokens[[2, 1]], positions[[2, 1]]
            tokens = dec.decode(tokens, positions).argmax(-1)
            positions = positions + 1
            for slot, row in enumerate(rows):
                got[row].append(int(tokens[slot]))
        assert got[0] == refs[0][:5], (layout.how, layout.kernel, layout.head)
        assert got[1] == refs[1] and got[2] == refs[2], (layout.how, layout.kernel, layout.head)
        alone = dec.prefill(3, [prompts[1]]).argmax(-1)  # one row: the one-row head form
        one = [int(alone[0])]
        pos = torch.tensor([len(prompts[1])])
        dec.move(3, 0, len(prompts[1]))
        for _ in range(15):
            alone = dec.decode(alone, pos).argmax(-1)
            pos = pos + 1
            one.append(int(alone[0]))
        assert one == refs[1], (layout.how, layout.kernel, layout.head_batch1)


def test_rotating_pairs_side_by_side_is_transformers_rotary_in_that_order():
    """The decoder reorders q/k rows so each rotated pair sits side by side and rotates by one complex
    multiply: the result must be transformers' rotary embedding, reordered the same way (so q·k is
    unchanged), in float32 and, rounded once, in bf16."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    heads, head_dim, t = 3, 16, 5
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, max_position_embeddings=64))
    q = torch.randn(1, t, heads, head_dim)
    cos, sin = rotary(q, torch.arange(3, 3 + t)[None])
    ref, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos, sin)  # [1, heads, t, head_dim]
    order = pairs_side_by_side(heads * head_dim, head_dim)
    reordered = lambda x: x.reshape(1, t, heads * head_dim)[..., order].view(1, t, heads, head_dim)  # noqa: E731
    got = rotate(reordered(q), rotation_of(cos, sin))
    assert torch.allclose(got, reordered(ref.transpose(1, 2)), atol=1e-6)
    got16 = rotate(reordered(q).bfloat16(), rotation_of(cos.bfloat16(), sin.bfloat16()))
    assert got16.dtype == torch.bfloat16 and torch.allclose(got16.float(), reordered(ref.transpose(1, 2)), atol=3e-2)


@pytest.mark.parametrize("policy", ["factored", "dense", "mixed at odd ranks"])
def test_the_decoders_logits_are_transformers_own(tiny_member_dir, policy):
    """Prefill and one decode step: transformers' logits to float32 rounding (a rotary or norm that is
    slightly off moves them by 1e-3 on the tiny model, and its greedy tokens may not show it)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_member_dir, dtype=torch.float32).eval()
    prompt = list(range(5, 40))
    layout = _mixed_at_odd_ranks(model) if policy == "mixed at odd ranks" else plan_layout(model, "float32", policy, kernel="aten")
    dec = StaticDecoder(model, layout, max_slots=2, max_len=64, min_width=8)
    first = dec.prefill(0, [prompt[:-1]])
    step = dec.decode(torch.tensor([prompt[-1]]), torch.tensor([len(prompt) - 1]))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([prompt])).logits
    assert torch.allclose(first[0], ref[0, -2], atol=1e-5) and torch.allclose(step[0], ref[0, -1], atol=1e-5)


def test_a_bf16_decoder_gives_transformers_bf16_logits(tiny_member_dir):
    """bf16 weights (`--dtype bfloat16/auto`): the rotary pairs are rotated in float32 and rounded back,
    so the decoder's logits stay those of transformers' own bf16 forward, within bf16's rounding."""
    model = AutoModelForCausalLM.from_pretrained(tiny_member_dir, dtype=torch.bfloat16).eval()
    prompt = [5, 6, 7, 8, 9, 10, 11]
    dec = StaticDecoder(model, plan_layout(model, "bfloat16", "dense", kernel="aten"), max_slots=2, max_len=64, min_width=8)
    first = dec.prefill(0, [prompt[:-1]])
    step = dec.decode(torch.tensor([prompt[-1]]), torch.tensor([len(prompt) - 1]))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([prompt])).logits.float()
    assert torch.allclose(first[0], ref[0, -2], atol=0.1, rtol=0.05)
    assert torch.allclose(step[0], ref[0, -1], atol=0.1, rtol=0.05)


def test_a_bf16_decoder_norms_as_transformers_does(tiny_member_dir):
    """Each RMSNorm at bf16 gives transformers' LlamaRMSNorm exactly (normalized in float32, rounded, then
    scaled): a fused bf16 norm rounds differently, and on SmolLM2-135M that flipped a greedy answer into a
    loop."""
    from server.decoder import _norm

    model = AutoModelForCausalLM.from_pretrained(tiny_member_dir, dtype=torch.bfloat16).eval()
    module = model.model.layers[0].input_layernorm
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 7, model.config.hidden_size).bfloat16() * 3
    with torch.no_grad():
        assert torch.equal(_norm(module)(x), module(x))
        fused = torch.nn.functional.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)
    assert not torch.equal(fused, module(x))  # the fused form is what this replaced


def test_killing_the_shared_worker_process_is_routed_around(tiny_family, tmp_path):
    """A worker process serving two members is SIGKILLed: both members' requests go to the other worker,
    and the gateway marks the dead worker out for each member it served."""
    fam = load_family(tiny_family)
    members = ["tiny-p80", "tiny-p60"]
    with WorkerProcess([fam.member_dir(m) for m in members], members, "torch", log=tmp_path / "shared.log", ready_timeout=300) as victim, \
            serve(create_app({m: fam.member_dir(m) for m in members}, max_model_len=256, max_batch=4)) as survivor:
        specs = [WorkerSpec(url=u, member=m, device_class=DEVICE) for u in (victim.url, survivor) for m in members]
        with serve(create_gateway(fam, specs, health_interval=0.3)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            deadline = time.monotonic() + 30
            while not all(w["healthy"] for w in httpx.get(f"{url}/v1/family").json()["workers"]):
                assert time.monotonic() < deadline, "workers never healthy"
                time.sleep(0.1)
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(timeout=10)
            served_by = set()
            for i in range(8):
                raw = client.completions.with_raw_response.create(model=members[i % 2], prompt="a", max_tokens=2)
                assert raw.http_response.status_code == 200
                served_by.add(raw.headers["x-family-worker"])
            assert served_by == {survivor}
            state = [w for w in httpx.get(f"{url}/v1/family").json()["workers"] if w["url"] == victim.url]
            assert {w["member"] for w in state} == set(members)
            assert all(w["healthy"] is False or w["in_cooldown"] for w in state)


def test_the_gateways_in_flight_gauge_is_per_member_of_a_shared_worker(tiny_family):
    """A stream in flight to one member of a shared worker: the gateway's in-flight gauge shows it on that
    member's series only (one gauge per worker URL would be overwritten by whichever member moved last)."""
    fam = load_family(tiny_family)
    members = ["tiny-p80", "tiny-p60"]
    with serve(create_app({m: fam.member_dir(m) for m in members}, max_model_len=2048, max_batch=4)) as worker:
        specs = [WorkerSpec(url=worker, member=m, device_class=DEVICE) for m in members]
        with serve(create_gateway(fam, specs, health_interval=0.3)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            client.completions.create(model=members[1], prompt="a", max_tokens=2)  # p60 busy, then free again
            stream = _decoding_stream(client, members[0])
            text = httpx.get(f"{url}/metrics").text
            stream.close()
    gauge = {m: [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("family_worker_in_flight{") and f'member="{m}"' in line] for m in members}
    assert gauge == {members[0]: [1.0], members[1]: [0.0]}


def test_local_workers_serve_every_member_in_one_process_at_the_asked_dtype(tiny_family, tmp_path):
    """`family serve --dtype bfloat16`: one torch worker for all members, each served at bf16 (its /health
    says so, which is what a profile at that dtype records and the router reads accuracy at)."""
    from server.fleet import LocalWorkers

    fam = load_family(tiny_family)
    local = LocalWorkers(fam, "torch", DEVICE, log_dir=tmp_path, threads=1, dtype="bfloat16")
    try:
        assert len(local.processes) == 1 and {s.member for s in local.specs} == {m.name for m in fam.servable}
        serving = httpx.get(f"{local.processes[0].url}/health").json()["serving"]
        assert {name: s["dtype"] for name, s in serving.items()} == {m.name: "bfloat16" for m in fam.servable}
    finally:
        local.close()
