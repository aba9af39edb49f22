"""The bandwidth limit of decoding, measured on this machine (issue 11).

At batch 1 a decoder reads every weight once per output token, so no engine can decode faster than
memory bandwidth / weight bytes tokens per second: the roofline. Knowing it says whether a slow parent
is slow because of bytes (nothing to gain but fewer bytes: smaller members) or because of per-operation
overhead (an engine problem). The read is STREAM-like: a sum over a buffer as large as the parent's
weights (so it does not fit in any cache), through torch on the serving threads, best of N passes;
beside the sum, the matrix-vector products a decode step is made of read the same buffer, and the best
pass of any of them is the bandwidth (a kernel that cannot stream at full speed must not lower it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from family import defaults
from family.registry import DeviceRecord


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float  # the best pass of any read kernel
    kernel: str  # the kernel of that pass
    buffer_bytes: int
    best_s: float
    per_kernel: dict[str, float]  # kernel → its best bytes/s
    repeats: int
    threads: int


ROW = 4096  # the buffer read as a matrix [n / ROW, ROW], as a decode step reads a weight


def _kernels(buf: torch.Tensor) -> dict:
    """Reads of every byte of `buf` once: a sum (STREAM-like), and the matrix-vector products a decode
    step is made of (y = W·x and y = Wᵀ·x); torch's fastest path differs per machine, so all are tried."""
    mat = buf[: buf.numel() // ROW * ROW].view(-1, ROW)
    x, xt = torch.ones(ROW), torch.ones(mat.shape[0])
    return {"sum": lambda: buf.sum(), "matvec": lambda: torch.mv(mat, x), "matvec_t": lambda: torch.mv(mat.t(), xt)}


def measure_bandwidth(buffer_bytes: int, repeats: int = defaults.BANDWIDTH_REPEATS, threads: int | None = None) -> Bandwidth:
    """Read a float32 buffer of `buffer_bytes` with each kernel, best of `repeats` passes each (kernels
    interleaved, so a burst of load from other processes does not hit one kernel only); the bandwidth is
    the best pass: what memory allows at least, on this machine, through torch.

    The buffer is written first, so its pages are resident and the passes measure reads, not page faults.
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(max(ROW, buffer_bytes // 4), dtype=torch.float32)
        kernels = _kernels(buf)
        best = {k: float("inf") for k in kernels}
        for f in kernels.values():
            f()  # warm: thread pool up, pages touched
        for _ in range(max(1, repeats)):
            for k, f in kernels.items():
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
        n = buf.numel() * 4
        n_threads = torch.get_num_threads()
        del buf, kernels
    finally:
        torch.set_num_threads(old)
    kernel = min(best, key=best.get)
    return Bandwidth(bytes_per_s=n / best[kernel], kernel=kernel, buffer_bytes=n, best_s=best[kernel],
                     per_kernel={k: n / t for k, t in best.items()}, repeats=max(1, repeats), threads=n_threads)


def measure_matmul_flops(dtype: str = "float32", size: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
    """Dense matmul FLOP/s at `dtype` (best of `repeats` square matmuls): what prefill is bound by."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dt = getattr(torch, dtype)
        a, b = torch.randn(size, size).to(dt), torch.randn(size, size).to(dt)
        a @ b  # warm
        best = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return 2.0 * size**3 / best


def measure_device(device_class: str, buffer_bytes: int, *, dtype: str = "float32", threads: int | None = None,
                   repeats: int = defaults.BANDWIDTH_REPEATS, command: str = "") -> DeviceRecord:
    """This machine's figures for `device_class`: bandwidth over `buffer_bytes` and the matmul rate at `dtype`."""
    bw = measure_bandwidth(buffer_bytes, repeats, threads)
    flops = measure_matmul_flops(dtype, threads=threads)
    return DeviceRecord(device_class=device_class, bandwidth_bytes_s=bw.bytes_per_s, matmul_flops=flops, dtype=dtype,
                        basis="measured", buffer_bytes=bw.buffer_bytes, repeats=bw.repeats, threads=bw.threads, kernel=bw.kernel,
                        source=command)


def roofline_tok_s(bandwidth_bytes_s: float, weight_bytes: int, *, batch: int = 1, kv_bytes_per_token: int = 0,
                   context: int = 0) -> float:
    """The most tokens/s memory bandwidth allows: each decode step reads the weights once for the whole
    batch plus every row's `context` tokens of KV cache, and yields `batch` tokens."""
    step_bytes = weight_bytes + batch * kv_bytes_per_token * context
    return batch * bandwidth_bytes_s / step_bytes
