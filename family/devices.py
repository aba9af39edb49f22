"""Device classes nobody has profiled yet: published figures, and the latency profile they predict.

A fleet may list a worker on, say, an `h100` before any member was profiled there (issue 11). Decoding
is bound by memory bandwidth: every step reads every weight once (for the whole batch) and each row's
KV cache; prefill is bound by matmul throughput (2 FLOPs per parameter per prompt token). So a
member's latency law on such a device follows from the device's bandwidth and matmul rate and the
member's bytes, at stated efficiencies (family/defaults.py). The result is a `LatencyProfile` marked
`basis: predicted`; the router uses it until `family profile` measures the real thing, and the
router's per-worker observed/predicted ratios correct it meanwhile.

For a member this small (135M parameters) a GPU step is bound by kernel launches more than by bytes,
so the prediction is optimistic there; it orders members correctly (fewer bytes, faster) and gives the
first requests sensible budgets, which is what it is for.
"""

from __future__ import annotations

from family import defaults
from family.registry import DTYPE_BYTES, DeviceRecord, LatencyProfile, MemberRecord, MemoryBreakdown, PredictionBasis

TB = 1e12


def _published(name: str, bandwidth_tb_s: float, tflops: float, source: str, dtype: str = "bfloat16") -> DeviceRecord:
    return DeviceRecord(device_class=name, bandwidth_bytes_s=bandwidth_tb_s * TB, matmul_flops=tflops * TB, dtype=dtype,
                        basis="published", source=source, measured_at="")


# Peak memory bandwidth and dense (no sparsity) bf16 matmul rate from each maker's datasheet. Device class
# names are what a fleet file says in `device_class`.
PUBLISHED: dict[str, DeviceRecord] = {d.device_class: d for d in (
    _published("h100", 3.35, 989.0, "NVIDIA H100 SXM5 datasheet: 3.35 TB/s HBM3, 989 TFLOPS bf16 dense (nvidia.com/en-us/data-center/h100)"),
    _published("h100-pcie", 2.0, 756.0, "NVIDIA H100 PCIe datasheet: 2.0 TB/s HBM2e, 756 TFLOPS bf16 dense (nvidia.com/en-us/data-center/h100)"),
    _published("h200", 4.8, 989.0, "NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e, 989 TFLOPS bf16 dense (nvidia.com/en-us/data-center/h200)"),
    _published("a100", 2.039, 312.0, "NVIDIA A100 80GB SXM datasheet: 2,039 GB/s HBM2e, 312 TFLOPS bf16 dense (nvidia.com/en-us/data-center/a100)"),
    _published("a100-40gb", 1.555, 312.0, "NVIDIA A100 40GB datasheet: 1,555 GB/s HBM2, 312 TFLOPS bf16 dense (nvidia.com/en-us/data-center/a100)"),
    _published("l40s", 0.864, 362.0, "NVIDIA L40S datasheet: 864 GB/s GDDR6, 362 TFLOPS bf16 dense (nvidia.com/en-us/data-center/l40s)"),
    _published("a10", 0.6, 125.0, "NVIDIA A10 datasheet: 600 GB/s GDDR6, 125 TFLOPS bf16 dense (nvidia.com/en-us/data-center/products/a10-gpu)"),
    _published("l4", 0.3, 121.0, "NVIDIA L4 datasheet: 300 GB/s GDDR6, 121 TFLOPS bf16 dense (nvidia.com/en-us/data-center/l4)"),
    _published("t4", 0.32, 65.0, "NVIDIA T4 datasheet: 320 GB/s GDDR6, 65 TFLOPS fp16 (no bf16) (nvidia.com/en-us/data-center/tesla-t4)", "float16"),
    _published("mi300x", 5.3, 1307.0, "AMD Instinct MI300X datasheet: 5.3 TB/s HBM3, 1307 TFLOPS bf16 dense (amd.com/en/products/accelerators/instinct/mi300/mi300x.html)"),
)}


def device_record(device_class: str, devices: dict[str, DeviceRecord] | None = None) -> DeviceRecord | None:
    """The figures a prediction uses: this machine's measurement where the registry holds one, else the
    published datasheet figures, else None (an unknown device class: no prediction)."""
    if devices and device_class in devices:
        return devices[device_class]
    return PUBLISHED.get(device_class)


def predicted_memory(member: MemberRecord, dtype: str, *, kv_batch: int = defaults.SERVING_BATCH,
                     kv_context: int = defaults.KV_CONTEXT) -> MemoryBreakdown:
    """Weights at `dtype` plus the KV cache at the worker's batch and context, from the registry's counts
    (the runtime is not predicted: it depends on the engine and is paid once per host)."""
    per_value = DTYPE_BYTES.get(dtype, 4)
    return MemoryBreakdown(basis="predicted", dtype=dtype, weights_bytes=member.parameters * per_value,
                           kv_bytes_per_token=(member.kv_values_per_token or 0) * per_value,
                           kv_batch=kv_batch, kv_context=kv_context)


def predicted_model(weight_bytes: int, kv_bytes_per_token: int, flops_per_token: float, device: DeviceRecord, *,
                    bandwidth_efficiency: float = defaults.PREDICTED_BANDWIDTH_EFFICIENCY,
                    compute_efficiency: float = defaults.PREDICTED_COMPUTE_EFFICIENCY) -> dict[str, float]:
    """Coefficients of family.latency's law from bytes and FLOPs:

    - one decode step reads the weights once and each row's context of KV: b0 = W/B, b1 = 0,
      b2 = KV per token / B (the law's c·(p + o/2) is the KV tokens a step reads);
    - prefill: one pass over the weights, then 2·params FLOPs per prompt token, its own and the other
      requests' in the batch: a0 = W/B, a1 = a2 = F/R; each request ahead adds a decode step: a3 = b0;
    with B = bandwidth × its efficiency and R = matmul rate × its efficiency.
    """
    bandwidth = device.bandwidth_bytes_s * bandwidth_efficiency
    step = weight_bytes / bandwidth
    per_prompt_token = flops_per_token / (device.matmul_flops * compute_efficiency) if device.matmul_flops else 0.0
    return {"a0": step, "a1": per_prompt_token, "a2": per_prompt_token, "a3": step,
            "b0": step, "b1": 0.0, "b2": kv_bytes_per_token / bandwidth}


def predict_profile(member: MemberRecord, device_class: str, devices: dict[str, DeviceRecord] | None = None) -> LatencyProfile | None:
    """A `basis: predicted` profile of `member` on `device_class`, or None when the device class is
    unknown or has no matmul rate to predict prefill from."""
    device = device_record(device_class, devices)
    if device is None or device.matmul_flops is None:
        return None
    memory = predicted_memory(member, device.dtype)
    basis = PredictionBasis(device=device, bandwidth_efficiency=defaults.PREDICTED_BANDWIDTH_EFFICIENCY,
                            compute_efficiency=defaults.PREDICTED_COMPUTE_EFFICIENCY, weight_bytes=memory.weights_bytes,
                            kv_bytes_per_token=memory.kv_bytes_per_token, flops_per_token=2.0 * member.parameters)
    model = predicted_model(basis.weight_bytes, basis.kv_bytes_per_token, basis.flops_per_token, device)
    return LatencyProfile(device_class=device_class, engine="predicted", basis="predicted", dtype=device.dtype,
                          memory=memory, prediction=basis, latency_model=model,
                          command=f"predicted from {device.basis} device figures ({device.source})", measured_at="")
