"""A member's serving memory, measured in parts (issue 11): runtime, weights, KV cache per token.

A small worker's resident set is mostly its runtime (the interpreter, torch, transformers, the HTTP
stack, thread pools): 1.6-1.9 GB for weights of 0.38-0.54 GB in the default family. That part is the
same for every member and, where one engine process serves several members, paid once per host; a
`max_memory_gb` budget must separate members by what each one adds. So the measurement runs in a fresh
process and takes, in order:

- runtime: RSS once the worker's stack is imported and torch's thread pool has run a matmul;
- weights: the loaded model's tensors at the serving dtype (unique storages, so tied embeddings count
  once), as the engine holds them;
- KV cache per token: the keys and values a real forward pass caches, over the tokens it ran, at the
  engine's cache dtype (`kv_dtype`: the torch engine caches float32 whatever its weights' dtype).

`measure_memory` runs it in a fresh process for several members (the runtime is measured once,
before any is loaded); `python -m family.memory --member-dir D [--member-dir E ...]` prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from family.errors import FamilyError
from family.registry import DTYPE_BYTES

PROBE_TOKENS = 8  # tokens of the forward pass whose cache is weighed


@dataclass(frozen=True)
class MemberMemory:
    weights_bytes: int
    weights_rss_bytes: int  # RSS growth while loading (safetensors may map more than it keeps)
    kv_bytes_per_token: int


@dataclass(frozen=True)
class MemoryProbe:
    runtime_bytes: int
    dtype: str
    members: dict[str, MemberMemory]  # by member folder, as given
    kv_dtype: str  # the KV cache's dtype, as the engine stores it


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _cache_tensors(cache) -> list:
    """Keys and values of every layer, whatever the transformers cache class."""
    if hasattr(cache, "layers"):  # transformers ≥ 4.54: Cache.layers[i].keys / .values
        return [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
    if hasattr(cache, "key_cache"):
        return [*cache.key_cache, *cache.value_cache]
    return [t for pair in cache for t in pair]


def probe(member_dirs: list[Path], dtype: str = "float32", threads: int | None = None, kv_dtype: str | None = None) -> MemoryProbe:
    """Measure in this process: the runtime once (call it in a fresh process: the figure is this
    process's RSS so far), then each member in turn, loaded, weighed and dropped. The cache's values
    are counted at `kv_dtype` (default: `dtype`), as the engine stores them."""
    import fastapi  # noqa: F401  the worker's HTTP stack is part of its runtime
    import torch
    import transformers
    import uvicorn  # noqa: F401

    import family  # noqa: F401  registers the low-rank architecture with transformers

    if threads:
        torch.set_num_threads(threads)
    torch.ones(256, 256) @ torch.ones(256, 256)  # thread pool up
    runtime = _rss()
    members = {}
    for member_dir in member_dirs:
        before = _rss()
        model = transformers.AutoModelForCausalLM.from_pretrained(member_dir, dtype=getattr(torch, dtype)).eval()
        weights_rss = _rss() - before
        storages = {}
        for t in [*model.parameters(), *model.buffers()]:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        ids = torch.arange(PROBE_TOKENS, dtype=torch.long).unsqueeze(0) % model.config.vocab_size
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values
        kv = sum(t.numel() for t in _cache_tensors(cache)) * DTYPE_BYTES[kv_dtype or dtype]
        members[str(member_dir)] = MemberMemory(weights_bytes=sum(storages.values()), weights_rss_bytes=weights_rss,
                                                kv_bytes_per_token=kv // PROBE_TOKENS)
        del model, cache
    return MemoryProbe(runtime_bytes=runtime, dtype=dtype, members=members, kv_dtype=kv_dtype or dtype)


def measure_memory(member_dirs: list[Path], dtype: str = "float32", threads: int | None = None, timeout: float = 900.0,
                   kv_dtype: str | None = None) -> MemoryProbe:
    """`probe` in a fresh Python process, so that nothing this process loaded counts as runtime."""
    cmd = [sys.executable, "-m", "family.memory", "--dtype", dtype, *(["--threads", str(threads)] if threads else []),
           *(["--kv-dtype", kv_dtype] if kv_dtype else []), *[a for d in member_dirs for a in ("--member-dir", str(d))]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FamilyError(f"memory probe of {', '.join(map(str, member_dirs))} failed: {tail}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return MemoryProbe(runtime_bytes=out["runtime_bytes"], dtype=out["dtype"], kv_dtype=out["kv_dtype"],
                       members={k: MemberMemory(**v) for k, v in out["members"].items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--member-dir", type=Path, action="append", required=True, help="repeat for several members")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16", "float16"], help="the KV cache's (default: --dtype)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(asdict(probe(args.member_dir, args.dtype, args.threads or None, args.kv_dtype))))


if __name__ == "__main__":
    main()
