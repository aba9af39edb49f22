"""vLLM serves a low-rank member through the plugin, token for token like transformers.

Real processes: vLLM's own OpenAI server (compiled, about 60-90 s to start on this CPU), started by
`family worker --engine vllm`. Marked slow; the GPU variant skips cleanly without a GPU.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from family import defaults
from family.lowrank import PROJECTIONS
from family.profile import wait_healthy
from tests.server.conftest import free_port

PROMPTS = ["The capital of France is", "Once upon a time, there was", "The river flows through", "In 1999, the company"]


def exact_svd_member(parent_dir, out, ranks: dict[str, int | None], width: int | None = None):
    """A low-rank member of the parent at `ranks` by exact truncated SVD (B = U·S, A = Vh); rank None
    means full rank (the same function as the parent, as two matmuls). With `width`, every MLP first
    keeps only its first `width` neurons (a narrower intermediate size, as `--method width` makes).
    Saved with the tokenizer."""
    from family.lowrank import LowRankLlamaForCausalLM, lowrank_config_from

    parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32).eval()
    if width:
        with torch.no_grad():
            for layer in parent.model.layers:
                mlp = layer.mlp
                mlp.gate_proj.weight = torch.nn.Parameter(mlp.gate_proj.weight[:width].clone())
                mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight[:width].clone())
                mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, :width].clone())
        parent.config.intermediate_size = width
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK threads spin on a busy machine
    factors = {}
    for path, rank in ranks.items():
        U, S, Vh = torch.linalg.svd(parent.get_submodule(path).weight.detach().double(), full_matrices=False)
        r = rank or len(S)
        factors[path] = ((U[:, :r] * S[:r]).float().contiguous(), Vh[:r].float().contiguous())
    torch.set_num_threads(threads)
    member = LowRankLlamaForCausalLM(lowrank_config_from(parent.config, {p: B.shape[1] for p, (B, _) in factors.items()}))
    state = {k: v for k, v in parent.state_dict().items() if not k.startswith(tuple(p + "." for p in factors))}
    for path, (B, A) in factors.items():
        state[f"{path}.B.weight"], state[f"{path}.A.weight"] = B, A
    member.load_state_dict(state, strict=False)
    member.tie_weights()
    member.generation_config = parent.generation_config
    member.save_pretrained(out)
    AutoTokenizer.from_pretrained(parent_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def real_member_dir(real_parent_dir, tmp_path_factory):
    """A member of the real SmolLM2-135M with every MLP narrowed to 1280 of its 1536 neurons, and in
    layers 0-7 every projection factored (full rank in 0-5, the MLP at rank 288 in 6-7) except two left
    dense (layer 0 q_proj, layer 1 down_proj); the rest dense. So it covers factored q/k/v sharing one
    A matmul next to a dense one, factored o/down, dense layers, and a width-pruned MLP."""
    ranks: dict[str, int | None] = {}
    for i in range(8):
        for proj in PROJECTIONS:
            ranks[f"model.layers.{i}.{proj}"] = 288 if i >= 6 and proj.startswith("mlp.") else None
    del ranks["model.layers.0.self_attn.q_proj"], ranks["model.layers.1.mlp.down_proj"]
    return exact_svd_member(real_parent_dir, tmp_path_factory.mktemp("smol-lowrank"), ranks, width=1280)


def test_the_plugin_is_declared_and_registers_idempotently():
    """vLLM finds the plugin by its entry point and may call it several times per process."""
    from importlib.metadata import entry_points

    pytest.importorskip("vllm")
    from vllm import ModelRegistry

    from family.vllm_plugin import register

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "lowrank_llama"]
    assert ep.value == "family.vllm_plugin:register"
    register()
    register()
    assert "LowRankLlamaForCausalLM" in ModelRegistry.get_supported_archs()
    from family.vllm_model import LowRankLlamaForCausalLM

    # Names load one to one: no q/k/v or gate/up stacking of the factors.
    assert LowRankLlamaForCausalLM.packed_modules_mapping == {}
    assert LowRankLlamaForCausalLM.hf_to_vllm_mapper.map_name("model.layers.0.mlp.gate_proj.A.weight") == (
        "model.layers.0.mlp.gate_proj.A.weight"
    )


def test_the_vllm_command_carries_the_family_defaults_and_the_chat_template(tmp_path):
    import json

    from server.worker_vllm import vllm_command, vllm_env

    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    cmd = vllm_command(tmp_path, "m", 8123, max_model_len=512)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--served-model-name") + 1] == "m"
    assert "--enforce-eager" not in cmd and "--enforce-eager" in vllm_command(tmp_path, "m", 8123, eager=True)  # compiled by default
    assert cmd[cmd.index("--chat-template") + 1] == str((tmp_path / "chat_template.jinja").resolve())
    sampling = json.loads(cmd[cmd.index("--override-generation-config") + 1])
    assert sampling == {"temperature": defaults.DEFAULT_TEMPERATURE, "top_p": defaults.DEFAULT_TOP_P,
                        "max_new_tokens": defaults.DEFAULT_MAX_TOKENS}
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    env = vllm_env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] and env["VLLM_CACHE_ROOT"].endswith("vllm-cache")


def _vllm_worker(member_dir, tmp_path, device_args=()):
    port = free_port()
    log = open(tmp_path / "vllm.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "family.cli", "worker", "--engine", "vllm", "--member-dir", str(member_dir),
         "--name", "smol-lowrank", "--port", str(port), "--max-model-len", "1024", *device_args],
        stdout=log, stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def _greedy_matches(url, member_dir):
    """Greedy completions from vLLM equal transformers' generate() token for token (float32, several prompts);
    chat applies the member's template; streaming carries the same text; /metrics has vLLM's names."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    tok = AutoTokenizer.from_pretrained(member_dir)
    model = AutoModelForCausalLM.from_pretrained(member_dir, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        got = client.completions.create(model="smol-lowrank", prompt=prompt, max_tokens=24, temperature=0)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        want = out[0, ids["input_ids"].shape[1]:].tolist()  # ends with eos if it stopped there
        assert got.choices[0].text == tok.decode(want, skip_special_tokens=True), prompt
        # vLLM counts a final eos as a completion token (so does the torch worker)
        assert got.usage.prompt_tokens == ids["input_ids"].shape[1] and got.usage.completion_tokens == len(want)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model="smol-lowrank", messages=messages, max_tokens=16, temperature=0)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert chat.choices[0].message.content == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    stream = client.chat.completions.create(model="smol-lowrank", messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    metrics = httpx.get(f"{url}/metrics").text
    assert "vllm:num_requests_running" in metrics and "vllm:time_to_first_token_seconds" in metrics


@pytest.mark.slow
def test_vllm_cpu_serves_a_low_rank_member_like_transformers(real_member_dir, tmp_path):
    pytest.importorskip("vllm")
    proc, url = _vllm_worker(real_member_dir, tmp_path)
    try:
        wait_healthy(url, timeout=400, proc=proc)
        _greedy_matches(url, real_member_dir)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU and the vllm (CUDA) package")
def test_vllm_gpu_serves_a_low_rank_member_like_transformers(real_member_dir, tmp_path):
    pytest.importorskip("vllm")
    proc, url = _vllm_worker(real_member_dir, tmp_path)
    try:
        wait_healthy(url, timeout=600, proc=proc)
        _greedy_matches(url, real_member_dir)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
