"""What XLA makes of an 8-bit dot on this GPU: the custom calls and fusions in the compiled
program of x_q [T, K] . w_q [N, K]^T (int8 -> int32, e4m3 -> float32), per T, and its time.

  PYTHONPATH=. python benchmarks/device/xla_8bit_probe.py
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp

K, N = 4096, 6144


def main():
    for kind, code, acc in (("int8", jnp.int8, jnp.int32), ("fp8", jnp.float8_e4m3fn, jnp.float32)):
        w = jax.random.normal(jax.random.key(0), (N, K), jnp.float32).astype(code)
        for t in (1, 16, 64):
            x = jax.random.normal(jax.random.key(1), (t, K), jnp.float32).astype(code)
            fn = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=acc))
            try:
                compiled = fn.lower(x, w).compile()
            except Exception as e:  # noqa: BLE001 - reported
                print(kind, t, "compile failed:", str(e)[:300])
                continue
            text = compiled.as_text()
            targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
            fusions = sorted(set(re.findall(r'kind=k(\w+)', text)))
            compiled(x, w).block_until_ready()
            t0 = time.perf_counter()
            for _ in range(50):
                y = compiled(x, w)
            y.block_until_ready()
            us = (time.perf_counter() - t0) / 50 * 1e6
            print(f"{kind} T={t}: custom calls {targets}, fusions {fusions}, {us:.1f} us wall, "
                  f"{N * K / us / 1e6:.2f} TB/s of codes")


if __name__ == "__main__":
    main()
