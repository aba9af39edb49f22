"""What this machine computes fast, for choices that depend on it (training and generation dtype).

bf16 pays only where the hardware computes in bf16 natively: CUDA GPUs with bf16, CPUs with
AVX512-BF16 or AMX. On an AMD EPYC with avx512_bf16 a 576×1536 projection matmul ran about 3.6×
faster in bf16 than in fp32; on an AVX2-only EPYC a forward and backward of SmolLM2-135M cut to 0.8 ran
about 25× *slower* in bf16 (7 vs 185 tokens/s), and batch-32 generation about 10× slower (18 tokens/s),
because the bf16 kernels fall back to emulation there.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache  # the hardware does not change in a process: read /proc/cpuinfo once, not per config or heal
def bf16_is_fast() -> bool:
    """Whether bf16 compute is native here (a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_dtype() -> str:
    """The faster dtype for inference-only work here (generation): bfloat16 where native, else float32."""
    return "bfloat16" if bf16_is_fast() else "float32"
