"""The torch engine's decode path: a Llama forward over a static KV cache, laid out for bytes, not Python.

Why not `transformers`' own forward: at batch 1 a 135M-parameter decoder spends its time reading
weights, and every Python-level op (module calls, a DynamicCache that concatenates every step, masks
rebuilt per step, left-padded batches re-spliced when a request joins) is time not spent reading them.
Here each sequence owns a *slot* of a preallocated per-layer cache `[slots, kv_heads, width, head_dim]`
(grown by doubling, so its shape changes a handful of times per process, never per step); the running
rows sit in slots 0..n-1, so one decode step is one batched forward over views of the cache, with
a key mask built from each row's position. A prompt is prefilled into a fresh slot with causal
attention over its own keys (no padding ever reaches a row's attention).

Projections follow a `Layout` (server.layout): the projections reading one input (q/k/v; gate/up)
are one stacked matmul whose rows are the dense weights of the merged ones and the A factors of the
factored ones, then each factored one's B; o and down are one matmul dense or two factored. Every
one runs on the layout's kernel (server.kernels: aten, or oneDNN on weights reordered at load), and
the tied LM head in the layout's measured call form (server.layout.HEADS; for a single row, the form
measured for batch 1, which may be inductor's streamed matrix-vector product).

Few ops per layer, because at batch 1 each op costs microseconds whatever its size: the norms are
one `F.rms_norm` each (transformers' module is seven ops), and the rotary embedding is one complex
multiply for q and one for k. For that the rows of q_proj and k_proj are reordered at load so that
each head's dimensions j and j + head_dim/2 (the pair the rotation mixes) sit side by side; q and k
get the same order, so every attention score q·k is unchanged, and only this decoder's own cache
ever holds the reordered keys. The cos/sin are `transformers`' rotary module's. One row decodes
without an attention mask (its keys are exactly the cache up to its position).

Not compiled: torch.compile (inductor, C++ codegen) of the layer loop took 7 minutes for the 2-layer
test model on this 2-core machine under load and, with the cache width changing as rows grow, kept
recompiling (`benchmarks/decode_paths.py --compile`: slower than eager there). Eager with few ops per
layer is the path; a compiled one would need fixed width buckets and a warm-up per bucket.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from family import defaults
from server.kernels import Linear
from server.layout import STAGES, Form, Layout, Projection, head_logits


def pairs_side_by_side(rows: int, head_dim: int) -> torch.Tensor:
    """The row order that puts each head's dimensions j and j + head_dim/2 next to each other."""
    half = head_dim // 2
    head = torch.stack([torch.arange(half), torch.arange(half) + half], -1).flatten()
    return (torch.arange(0, rows, head_dim)[:, None] + head).flatten()


class Stage:
    """Projections of one shared input: one stacked first matmul, then a B matmul per factored one.
    `orders`: a row order for a projection's outputs (by index in `parts`), applied to its weights."""

    def __init__(self, parts: list[tuple[Projection, Form]], dtype: torch.dtype, kernel: str = "aten",
                 orders: dict[int, torch.Tensor] | None = None):
        firsts, biases, self.slices = [], [], []
        offset, has_bias = 0, any(p.bias is not None for p, _ in parts)
        for k, (proj, form) in enumerate(parts):
            first, second, bias = form.matrices(proj)
            if (order := (orders or {}).get(k)) is not None:  # the outputs' rows: B's where factored
                bias = None if bias is None else bias[order]
                first, second = (first[order], None) if second is None else (first, second[order])
            rows = first.shape[0]
            firsts.append(first)
            # A dense projection's bias belongs to the stacked matmul; a factored one's to its B.
            biases.append(bias if second is None and bias is not None else first.new_zeros(rows))
            b = None
            if second is not None:
                b = Linear(second.to(dtype), None if bias is None else bias.to(dtype), kernel)
            self.slices.append((offset, offset + rows, b))
            offset += rows
        self.first = Linear(torch.cat(firsts).to(dtype), torch.cat(biases).to(dtype) if has_bias else None, kernel)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.first(x)
        if len(self.slices) == 1 and self.slices[0][2] is None:
            return [h]
        return [h[..., a:b] if second is None else second(h[..., a:b]) for a, b, second in self.slices]


def _norm(module: nn.Module):
    """A Llama RMSNorm module: one `F.rms_norm` at float32; below it, in transformers' own order (normalize
    in float32, round, then scale by the weight). A fused bf16 norm rounds once where transformers rounds
    twice, and that alone turned the parent's greedy answer to "Give me three tips for sleeping better."
    into "1. **1.1.1.1…" at bf16, where transformers' bf16 forward answers as float32 does."""
    weight, eps = module.weight.detach(), module.variance_epsilon
    if weight.dtype in (torch.float32, torch.float64):
        return lambda x: F.rms_norm(x, weight.shape, weight, eps)

    def norm(x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    return norm


def rotation_of(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' Llama cos/sin [n, t, head_dim] (each half the same) as complex rotations
    [n, t, 1, head_dim/2], one per pair and shared by the heads."""
    half, real = cos.shape[-1] // 2, torch.float64 if cos.dtype == torch.float64 else torch.float32
    return torch.complex(cos[..., :half].to(real), sin[..., :half].to(real))[:, :, None]


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `x` [n, t, heads, head_dim] whose pairs sit side by side, as a complex
    multiply (bf16 has no complex type: its pairs are rotated in float32 and rounded back). A dense q or
    k is a view into its stage's stacked output, at an odd offset or row stride when a factored neighbour
    has an odd rank, and a complex view needs both even: only such a view is copied first."""
    pairs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.clone(memory_format=torch.contiguous_format)
    return torch.view_as_real(torch.view_as_complex(pairs.unflatten(-1, (-1, 2))) * rotation).flatten(-2).to(x.dtype)


class _Layer:
    def __init__(self, hf_layer: nn.Module, qkv: Stage, o: Stage, gate_up: Stage, down: Stage):
        self.ln1, self.ln2 = _norm(hf_layer.input_layernorm), _norm(hf_layer.post_attention_layernorm)
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down


class StaticDecoder:
    """One member's weights as served, plus its KV cache. Not thread-safe: the scheduler thread owns it."""

    def __init__(self, model: nn.Module, layout: Layout, *, max_slots: int, max_len: int, min_width: int = 128):
        cfg = model.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {cfg.hidden_act!r} (the Llama family uses silu)")
        self.layout, self.dtype = layout, layout.dtype
        # The KV cache and attention stay float32 whatever the weights' dtype: torch's CPU attention at
        # bf16 took 6-10x float32's time at decode shapes (58 against 10 us a layer at one row and 128
        # positions, 3.3 against 0.33 ms at 16 rows and 512), more than a bf16 step saves on the weights.
        self.cache_dtype = getattr(torch, defaults.TORCH_KV_DTYPE)
        model = model.to(layout.dtype)
        self.embed, self.norm, self.rotary = model.model.embed_tokens, _norm(model.model.norm), model.model.rotary_emb
        self.lm_head = model.lm_head.weight.detach()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.layers = []
        pairs = {0: pairs_side_by_side(self.heads * self.head_dim, self.head_dim),  # q and k (STAGES[0] is q, k, v)
                 1: pairs_side_by_side(self.kv_heads * self.head_dim, self.head_dim)}
        for i, hf_layer in enumerate(model.model.layers):
            stages = [Stage([(Projection.of(model, f"model.layers.{i}.{n}"), layout.forms[f"model.layers.{i}.{n}"]) for n in names],
                            layout.dtype, layout.kernel, orders=pairs if names == STAGES[0] else None) for names in STAGES]
            self.layers.append(_Layer(hf_layer, *stages))
        self.max_slots, self.max_len, self.min_width = max_slots, max_len, min_width
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    # --- the cache ----------------------------------------------------------------------------------

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reserve(self, slots: int, width: int) -> None:
        """Room for `slots` rows of `width` positions (capacity doubles; contents are kept)."""
        have_s, have_w = (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)
        if slots <= have_s and width <= have_w:
            return
        if width > self.max_len or slots > self.max_slots:
            raise ValueError(f"cache request {slots}x{width} past {self.max_slots}x{self.max_len}")
        new_s = min(self.max_slots, max(have_s, _pow2(slots)))
        new_w = min(self.max_len, max(have_w, self.min_width, _pow2(width)))
        shape = (new_s, self.kv_heads, new_w, self.head_dim)
        for store in (self.keys, self.values):
            for i in range(len(self.layers)):
                grown = torch.zeros(shape, dtype=self.cache_dtype)
                if store and len(store) > i:
                    grown[:have_s, :, :have_w] = store[i]
                    store[i] = grown
                else:
                    store.append(grown)

    @torch.inference_mode()  # the cache tensors are inference tensors (made in prefill/decode)
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a row's cache from slot `src` to slot `dst` (keeps the running rows in slots 0..n-1)."""
        for store in (self.keys, self.values):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]

    @torch.inference_mode()
    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the caches of slots `a` and `b` (their first `length` positions): puts the rows that
        decode alone first (server.deadline_scheduling)."""
        for store in (self.keys, self.values):
            for t in store:
                t[[a, b], :, :length] = t[[b, a], :, :length]

    # --- forward ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts into slots first_slot.. (right-padded together); the logits of each last token."""
        n, width = len(prompts), max(len(p) for p in prompts)
        self.reserve(first_slot + n, width)
        ids = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        positions = torch.arange(width)[None].expand(n, width)
        rows = slice(first_slot, first_slot + n)

        def attend(i: int, q, k, v):
            self.keys[i][rows, :, :width] = k
            self.values[i][rows, :, :width] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)

        x = self._layers(self.embed(ids), positions, attend)
        last = torch.tensor([len(p) - 1 for p in prompts])
        return self._logits(x[torch.arange(n), last])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of the rows in slots 0..n-1 (`tokens`, `positions`: [n]); their logits."""
        n = tokens.shape[0]
        width = int(positions.max()) + 1
        self.reserve(n, width)
        rows = torch.arange(n)
        # One row attends to the whole cache up to its position: no mask needed.
        mask = None if n == 1 else (torch.arange(width)[None] <= positions[:, None])[:, None, None, :]  # [n, 1, 1, width]

        def attend(i: int, q, k, v):
            keys, values = self.keys[i], self.values[i]
            if n == 1:  # a plain copy into the row's next position (an indexed write is a few µs more, 60 times a step)
                keys[0, :, width - 1].copy_(k[0, :, 0])
                values[0, :, width - 1].copy_(v[0, :, 0])
            else:
                keys[rows, :, positions] = k[:, :, 0]
                values[rows, :, positions] = v[:, :, 0]
            return F.scaled_dot_product_attention(q, keys[:n, :, :width], values[:n, :, :width], attn_mask=mask,
                                                  enable_gqa=self.kv_heads != self.heads)

        x = self._layers(self.embed(tokens[:, None]), positions[:, None], attend)
        return self._logits(x[:, 0])

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        n, t = positions.shape
        rotation = rotation_of(*self.rotary(x, positions))
        for i, layer in enumerate(self.layers):
            q, k, v = (y.to(self.cache_dtype) for y in layer.qkv(layer.ln1(x)))
            q = rotate(q.view(n, t, self.heads, self.head_dim), rotation).transpose(1, 2)
            k = rotate(k.view(n, t, self.kv_heads, self.head_dim), rotation).transpose(1, 2)
            v = v.reshape(n, t, self.kv_heads, self.head_dim).transpose(1, 2)
            a = attend(i, q, k, v).transpose(1, 2).reshape(n, t, self.heads * self.head_dim)
            x = x + layer.o(a.to(self.dtype))[0]
            gate, up = layer.gate_up(layer.ln2(x))
            x = x + layer.down(F.silu(gate) * up)[0]
        return x

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        form = self.layout.head_batch1 if last_hidden.shape[0] == 1 else self.layout.head
        return head_logits(self.norm(last_hidden), self.lm_head, form).float()


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
