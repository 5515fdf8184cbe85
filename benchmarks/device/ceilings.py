"""The card's memory and matrix ceilings, three ways in one process (GPU only):

- `jax_per_call`: each call timed alone on the wall clock (dispatch and the wait's round trip
  included): how `jaxinfer.devices.measure_ceilings` measured before 2026-12-02 (fifth run);
- `jax_queued`: `measure_ceilings` now (calls queued back to back, one wait);
- `torch_events`: PyTorch with CUDA events around 20 back-to-back calls (copy_, F.linear with
  one row, i.e. cuBLAS's matrix-vector product, and a bf16 matmul).

Same sizes everywhere: a 2 GiB float32 copy (bytes read + written), a 1 GiB bf16 weight read by
a one-row product, an 8192^3 bf16 product. Writes one JSON record to --out.

  python3 benchmarks/device/ceilings.py --out $OUT/ceilings.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def jax_per_call(repeats: int = 5) -> dict:
    import jax
    import jax.numpy as jnp

    def seconds(fn, *args):
        jax.block_until_ready(fn(*args))
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples.append(time.perf_counter() - t0)
        return float(np.median(samples))

    nbytes = 2048 * 2**20
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (nbytes // 4,), jnp.float32)
    copy_s = seconds(jax.jit(lambda a: a * 1.0001), x)
    w = x.reshape(-1, 8192).astype(jnp.bfloat16)
    v = jax.random.normal(key, (1, w.shape[0]), w.dtype)
    gemv_s = seconds(jax.jit(lambda a, b: a @ b), v, w)
    del x
    a = jax.random.normal(key, (8192, 8192), jnp.bfloat16)
    mm_s = seconds(jax.jit(lambda p, q: p @ q), a, a)
    return {"copy_bytes_per_s": 2 * nbytes / copy_s, "gemv_read_bytes_per_s": w.size * 2 / gemv_s,
            "matmul_flops_per_s": 2 * 8192**3 / mm_s}


def torch_events(calls: int = 20) -> dict:
    import torch
    import torch.nn.functional as F

    def seconds(fn):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(5):
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / calls)
        return float(np.median(samples))

    nbytes = 2048 * 2**20

    def copy_seconds():
        src = torch.randn(nbytes // 4, device="cuda")
        dst = torch.empty_like(src)
        return seconds(lambda: dst.copy_(src))

    def gemv_seconds():
        w = torch.randn(nbytes // 4 // 8192, 8192, device="cuda", dtype=torch.bfloat16)  # 1 GiB, read as [N, K]
        x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
        return seconds(lambda: F.linear(x, w)), w.numel() * 2

    def matmul_seconds():
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        return seconds(lambda: a @ a)

    copy_s = copy_seconds()
    gemv_s, gemv_bytes = gemv_seconds()
    mm_s = matmul_seconds()
    return {"copy_bytes_per_s": 2 * nbytes / copy_s, "gemv_read_bytes_per_s": gemv_bytes / gemv_s,
            "matmul_flops_per_s": 2 * 8192**3 / mm_s, "torch": torch.__version__}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import jax

    from jaxinfer.devices import measure_ceilings

    record = {"benchmark": "ceilings", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
              "command": "python3 benchmarks/device/ceilings.py --out OUT",
              "jax_per_call": jax_per_call(), "jax_queued": measure_ceilings()}
    try:
        record["torch_events"] = torch_events()
    except Exception as e:  # torch absent or without CUDA: the JAX rows still stand
        record["torch_events"] = {"error": repr(e)}
    for key in ("jax_per_call", "jax_queued", "torch_events"):
        r = record[key]
        if "copy_bytes_per_s" in r:
            print(f"{key:14s} copy {r['copy_bytes_per_s'] / 1e12:.2f} TB/s  matrix-vector "
                  f"{r['gemv_read_bytes_per_s'] / 1e12:.2f} TB/s  matmul {r['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
