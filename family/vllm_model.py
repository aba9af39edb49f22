"""The low-rank Llama for vLLM, built from vLLM's own layers (paged attention, rotary embedding,
RMSNorm, vocab-parallel embedding, logits processor, parallel linear layers) and vLLM's Llama classes
(LlamaForCausalLM, LlamaModel and the decoder layer's forward are reused as they are).

Each factored projection W ≈ B·A stays two matmuls, laid out for tensor parallelism:
- column-parallel projections (q, k, v, gate, up): A replicated (in → r, r is small), B split by
  output (r → out/tp), so each rank computes its own heads / MLP columns, as vLLM does for dense ones.
  Projections reading the same input share one matmul for their A factors: the A's of the factored
  ones among q/k/v are stacked into `qkv_A`, those of gate/up into `gate_up_A` (fewer, larger matmuls
  per token; a small model decoding on a CPU is bound by per-op costs as much as by bytes);
- row-parallel projections (o, down): A split by input (in/tp → r, partial sums all-reduced), B
  replicated (r → out).
A dense projection (not in `config.ranks`) is vLLM's ColumnParallelLinear / RowParallelLinear.
Checkpoint names stay those of the Hugging Face model (`...q_proj.B.weight`, `...q_proj.A.weight`);
`load_weights` places each A into its rows of the stacked matrix and everything else one to one.
vLLM's Llama mapper is not used: it renames any `.gate_proj`/`.q_proj` key to `gate_up_proj`/`qkv_proj`.
Tensor parallelism needs the heads and KV heads divisible by the TP size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import WeightsMapper, extract_layer_index, is_pp_missing_parameter
from vllm.distributed import get_tensor_model_parallel_world_size


class FactorB(nn.Module):
    """The B factor (r → out, column-parallel) of a projection whose A lives in a shared stacked matmul."""

    def __init__(self, rank: int, out_features: int, bias: bool, prefix: str):
        super().__init__()
        self.B = ColumnParallelLinear(rank, out_features, bias=bias, prefix=f"{prefix}.B")


class SharedInput(nn.Module):
    """Base of the attention and MLP blocks: column-parallel projections of one input.

    `build_shared` creates them as attributes of the block (so parameter names match the checkpoint):
    dense ones as ColumnParallelLinear, factored ones as FactorB, plus one ReplicatedLinear `a_name`
    holding the A factors of all factored ones stacked by rows (`a_rows`: name → (first row, rank)).
    """

    a_name: str = ""
    a_rows: dict[str, tuple[int, int]]

    def build_shared(self, ranks: dict, prefix: str, in_features: int, outs: dict[str, int], bias: bool, a_name: str) -> None:
        self.a_name, self.a_rows, offset = a_name, {}, 0
        for name, out in outs.items():
            rank = ranks.get(f"{prefix}.{name}")
            if rank is None:
                setattr(self, name, ColumnParallelLinear(in_features, out, bias=bias, prefix=f"{prefix}.{name}"))
            else:
                setattr(self, name, FactorB(int(rank), out, bias, f"{prefix}.{name}"))
                self.a_rows[name] = (offset, int(rank))
                offset += int(rank)
        if offset:
            setattr(self, a_name, ReplicatedLinear(in_features, offset, bias=False, prefix=f"{prefix}.{a_name}"))

    def shared_forward(self, x: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
        h = getattr(self, self.a_name)(x)[0] if self.a_rows else None
        outs = []
        for name in names:
            if name in self.a_rows:
                first, rank = self.a_rows[name]
                y, _ = getattr(self, name).B(h[..., first:first + rank].contiguous())
            else:
                y, _ = getattr(self, name)(x)
            outs.append(y)
        return outs


class FactoredRow(nn.Module):
    """y = B(A(x)) with A split over tensor-parallel ranks by input (results all-reduced)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, prefix: str):
        super().__init__()
        self.A = RowParallelLinear(in_features, rank, bias=False, reduce_results=True, prefix=f"{prefix}.A")
        self.B = ReplicatedLinear(rank, out_features, bias=bias, prefix=f"{prefix}.B")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h, _ = self.A(x)
        y, _ = self.B(h)
        return y, None


def row_projection(ranks: dict, prefix: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """A row-parallel projection (o, down): factored at its rank, or vLLM's dense RowParallelLinear."""
    rank = ranks.get(prefix)
    if rank is None:
        return RowParallelLinear(in_features, out_features, bias=bias, prefix=prefix)
    return FactoredRow(in_features, out_features, int(rank), bias, prefix)


class LowRankAttention(SharedInput):
    def __init__(self, config, cache_config, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        hidden = config.hidden_size
        self.total_heads = config.num_attention_heads
        self.total_kv_heads = getattr(config, "num_key_value_heads", None) or self.total_heads
        if self.total_heads % tp or self.total_kv_heads % tp:
            raise ValueError(
                f"tensor parallel size {tp} must divide the {self.total_heads} attention heads and the "
                f"{self.total_kv_heads} KV heads of this model (the low-rank layers do not replicate KV heads)"
            )
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.total_heads
        self.num_heads, self.num_kv_heads = self.total_heads // tp, max(1, self.total_kv_heads // tp)
        bias = bool(getattr(config, "attention_bias", False))
        ranks = config.ranks or {}
        q_out, kv_out = self.total_heads * self.head_dim, self.total_kv_heads * self.head_dim
        self.build_shared(ranks, prefix, hidden, {"q_proj": q_out, "k_proj": kv_out, "v_proj": kv_out}, bias, "qkv_A")
        self.o_proj = row_projection(ranks, f"{prefix}.o_proj", q_out, hidden, bias)
        self.rotary_emb = get_rope(
            self.head_dim, max_position=getattr(config, "max_position_embeddings", 8192),
            rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
            cache_config=cache_config, prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.shared_forward(hidden_states, ("q_proj", "k_proj", "v_proj"))
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class LowRankMLP(SharedInput):
    def __init__(self, config, prefix: str):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r} (silu only)")
        hidden, inter = config.hidden_size, config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        ranks = config.ranks or {}
        self.build_shared(ranks, prefix, hidden, {"gate_proj": inter, "up_proj": inter}, bias, "gate_up_A")
        self.down_proj = row_projection(ranks, f"{prefix}.down_proj", inter, hidden, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.shared_forward(x, ("gate_proj", "up_proj"))
        out, _ = self.down_proj(F.silu(gate) * up)
        return out


class LowRankDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer (its forward: norms, residuals) around low-rank attention and MLP."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None):
        nn.Module.__init__(self)  # not LlamaDecoderLayer.__init__: it would build the dense projections
        config = config or vllm_config.model_config.hf_config
        self.layer_idx = extract_layer_index(prefix)
        self.hidden_size = config.hidden_size
        self.self_attn = LowRankAttention(config, vllm_config.cache_config, prefix=f"{prefix}.self_attn")
        self.mlp = LowRankMLP(config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LowRankLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM (embedding, layer loop, lm head, logits) with low-rank decoder layers."""

    hf_to_vllm_mapper = WeightsMapper()  # no renaming: load_weights places every tensor itself
    packed_modules_mapping: dict[str, list[str]] = {}  # no vLLM-stacked qkv_proj / gate_up_proj (LoRA sees separate layers)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=LowRankDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Each checkpoint tensor into its namesake, except the A factors of q/k/v and gate/up, which go to
        their rows of the block's stacked `qkv_A` / `gate_up_A` (A is replicated: no sharding to do)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb." in name:  # inv_freq / cos-sin caches of old checkpoints: recomputed by vLLM
                continue
            if name.startswith("lm_head.") and self.config.tie_word_embeddings:
                continue  # tied to embed_tokens (a tied checkpoint has no lm_head key anyway)
            if is_pp_missing_parameter(name, self):
                continue  # lives on another pipeline stage
            if name.endswith(".A.weight"):
                block_path, _, proj = name[: -len(".A.weight")].rpartition(".")
                block = self.get_submodule(block_path)
                if proj in getattr(block, "a_rows", {}):
                    first, rank = block.a_rows[proj]
                    stacked = f"{block_path}.{block.a_name}.weight"
                    if tuple(tensor.shape) != (rank, params[stacked].shape[1]):
                        raise ValueError(f"{name}: shape {tuple(tensor.shape)} != ({rank}, {params[stacked].shape[1]}) from config.ranks")
                    params[stacked].data[first:first + rank].copy_(tensor)
                    loaded.add(stacked)
                    continue
            if name not in params:
                raise KeyError(f"checkpoint weight {name!r} has no place in the low-rank model (ranks in config.json?)")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        return loaded
