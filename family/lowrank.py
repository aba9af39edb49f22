"""The low-rank Llama: a Llama whose chosen projections are each a pair of factors W ≈ B·A.

A member of the family is an ordinary Llama with some `nn.Linear` projections replaced by
`LowRankLinear(A: in→r, B: r→out)`. Which projections are factored, and at what rank, is the only
thing that differs from the parent, so it lives in `config.ranks` (module path → rank, e.g.
``{"model.layers.0.mlp.down_proj": 256}``). A module missing from `ranks` stays dense. Weights are
saved as ``<module>.A.weight`` (r × in) and ``<module>.B.weight`` (out × r), which the vLLM plugin
(`family.vllm_model`) reads with the same names.

Importing this module registers the architecture with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(member_dir)`` works with no remote code.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

MODEL_TYPE = "lowrank_llama"
ARCHITECTURE = "LowRankLlamaForCausalLM"
# The projections of a Llama decoder layer that may be factored, by their attribute path in a layer.
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class LowRankLlamaConfig(LlamaConfig):
    """A LlamaConfig plus the rank of every factored projection."""

    model_type = MODEL_TYPE
    ranks: dict | None = None


class LowRankLinear(nn.Module):
    """y = B(A(x)): two matmuls of cost r·(in + out) instead of in·out per token."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense product B·A (out × in), for factorizing again at a lower rank."""
        return self.B.weight @ self.A.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def projection_paths(num_layers: int) -> list[str]:
    """Every factorable module path of a Llama with `num_layers` layers, in model order."""
    return [f"model.layers.{i}.{p}" for i in range(num_layers) for p in PROJECTIONS]


def replace_with_lowrank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Swap each named nn.Linear of `model` for a LowRankLinear of the given rank (fresh weights)."""
    for path, rank in ranks.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        dense = getattr(parent, attr)
        if isinstance(dense, LowRankLinear):
            in_f, out_f, bias = dense.in_features, dense.out_features, dense.B.bias is not None
        else:
            in_f, out_f, bias = dense.in_features, dense.out_features, dense.bias is not None
        layer = LowRankLinear(in_f, out_f, int(rank), bias=bias)
        layer.to(device=next(dense.parameters()).device, dtype=next(dense.parameters()).dtype)
        setattr(parent, attr, layer)


class LowRankLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose projections listed in `config.ranks` are LowRankLinear."""

    config_class = LowRankLlamaConfig

    def __init__(self, config: LowRankLlamaConfig):
        super().__init__(config)
        replace_with_lowrank(self, dict(config.ranks or {}))
        self.post_init()


def _config_fields(config: LlamaConfig) -> dict:
    """A member's config as keyword arguments, without what names its architecture or its ranks."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "ranks", "transformers_version", "auto_map"):
        fields.pop(key, None)
    return fields


def lowrank_config_from(config: LlamaConfig, ranks: dict[str, int]) -> LowRankLlamaConfig:
    """The config of a member: the parent's config (dense or low-rank) with new ranks."""
    out = LowRankLlamaConfig(**_config_fields(config), ranks={k: int(v) for k, v in sorted(ranks.items())})
    out.architectures = [ARCHITECTURE]
    return out


def llama_config_from(config: LlamaConfig) -> LlamaConfig:
    """A plain Llama's config from a member's (one with no factored projection): transformers and vLLM
    then serve it with their own Llama, whose fused q/k/v and gate/up matmuls the low-rank layers lack."""
    if getattr(config, "ranks", None):
        raise ValueError("a member with factored projections needs the low-rank architecture")
    out = LlamaConfig(**_config_fields(config))
    out.architectures = ["LlamaForCausalLM"]
    return out


def is_supported_config(config: object) -> bool:
    return getattr(config, "model_type", None) in ("llama", MODEL_TYPE)


AutoConfig.register(MODEL_TYPE, LowRankLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(LowRankLlamaConfig, LowRankLlamaForCausalLM, exist_ok=True)
