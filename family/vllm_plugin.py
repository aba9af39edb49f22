"""vLLM plugin (entry point `vllm.general_plugins`): teaches every vLLM process the low-rank Llama.

vLLM calls `register()` in its API server, engine-core and worker processes, possibly more than once
per process; registering is idempotent. Importing `family.lowrank` also registers the config class
with transformers, which vLLM uses to read `config.json`.
"""

from __future__ import annotations


def register() -> None:
    import family.lowrank  # noqa: F401  (AutoConfig knows "lowrank_llama")
    from vllm import ModelRegistry

    if "LowRankLlamaForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("LowRankLlamaForCausalLM", "family.vllm_model:LowRankLlamaForCausalLM")
