"""What a device can do: datasheet figures by device kind, and ceilings measured on the spot.

Benchmarks state their floor as bytes over bandwidth and FLOPs over peak. The datasheet row
is found by the device's `device_kind`; the measured ceilings (a large device copy, a large
matrix product) come from the same run, so a floor never silently assumes another chip.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Datasheet figures: HBM bandwidth (bytes/s) and dense bf16 matrix peak (FLOP/s)."""

    name: str
    memory_bytes_per_s: float
    bf16_flops_per_s: float


# Matched as substrings of jax.Device.device_kind, most specific first.
DATASHEET: tuple[tuple[str, DeviceSpec], ...] = (
    ("H200", DeviceSpec("NVIDIA H200 SXM", 4.8e12, 989e12)),
    ("H100 PCIe", DeviceSpec("NVIDIA H100 PCIe", 2.0e12, 756e12)),
    ("H100", DeviceSpec("NVIDIA H100 SXM", 3.35e12, 989e12)),
    ("A100", DeviceSpec("NVIDIA A100 SXM 80GB", 2.04e12, 312e12)),
    ("L4", DeviceSpec("NVIDIA L4", 0.3e12, 121e12)),
    ("TPU v5 lite", DeviceSpec("TPU v5e", 0.82e12, 197e12)),
    ("TPU v5p", DeviceSpec("TPU v5p", 2.76e12, 459e12)),
    ("TPU v6", DeviceSpec("TPU v6e", 1.64e12, 918e12)),
)


def datasheet(device: jax.Device | None = None) -> DeviceSpec | None:
    """The datasheet row of a device (default: the first), or None when none is known (CPUs)."""
    kind = (device or jax.devices()[0]).device_kind
    for key, spec in DATASHEET:
        if key in kind:
            return spec
    return None


def _seconds_per_call(fn, *args, repeats: int, calls: int) -> float:
    """Median over `repeats` of the time per call of `calls` calls queued back to back and
    waited for once. Timing one call at a time adds the dispatch and the wait's round trip to
    each (tens to hundreds of microseconds on a GPU), which understated the 1 GiB matrix-vector
    product's rate by ~30% and the copy's by ~23% on the H200 (benchmarks/device/ceilings.py)."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):  # one stream runs them in order; earlier outputs are freed as they go
            result = fn(*args)
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - t0) / calls)
    return float(np.median(samples))


def measure_ceilings(repeats: int = 5) -> dict:
    """Memory and matrix ceilings of the default device, measured on random inputs (never zeros):
    copy bandwidth (bytes read + written per second), the weight-read rate of a matrix-vector
    product (what decode does), their maximum as the bandwidth ceiling, and the rate of a large
    matrix product. 2 GiB and 8192^3 bf16 on accelerators; 512 MiB and 2048^3 float32 (the
    CPU's fast type) on the CPU, where an elementwise copy runs on one core and a matrix-vector
    product on all of them."""
    on_cpu = jax.default_backend() == "cpu"
    nbytes = (512 if on_cpu else 2048) * 2**20
    calls = 1 if on_cpu else 10  # a CPU's dispatch is negligible beside its ~0.1 s passes
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (nbytes // 4,), jnp.float32)
    copy_s = _seconds_per_call(jax.jit(lambda a: a * 1.0001), x, repeats=repeats, calls=calls)
    cols = 8192
    w = x.reshape(-1, cols).astype(jnp.float32 if on_cpu else jnp.bfloat16)
    v = jax.random.normal(key, (1, w.shape[0]), w.dtype)
    gemv_s = _seconds_per_call(jax.jit(lambda a, b: a @ b), v, w, repeats=repeats, calls=calls)
    gemv_bytes = w.size * w.dtype.itemsize
    del x, w
    n, dtype = (2048, jnp.float32) if on_cpu else (8192, jnp.bfloat16)
    a = jax.random.normal(key, (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    mm_s = _seconds_per_call(jax.jit(lambda p, q: p @ q), a, b, repeats=repeats, calls=calls)
    copy_rate, gemv_rate = 2 * nbytes / copy_s, gemv_bytes / gemv_s
    return {"bytes_per_s": max(copy_rate, gemv_rate), "copy_bytes_per_s": copy_rate,
            "gemv_read_bytes_per_s": gemv_rate, "matmul_flops_per_s": 2 * n**3 / mm_s,
            "matmul": f"{n}^3 {jnp.dtype(dtype).name}", "copy_bytes": nbytes, "gemv_bytes": gemv_bytes}
