"""Runs one kernel a few times at a benchmark shape, for a profiler to attach to.

  ncu --kernel-name regex:paged_decode --launch-skip 3 --launch-count 1 --set full \
      python benchmarks/profile_kernel.py decode --page-size 16
  ncu --launch-skip 3 --launch-count 1 --set full python benchmarks/profile_kernel.py flash-mosaic

decode: P4 (batch 64, context 2048, 32 q / 8 kv heads, head_dim 128, bf16), ours.
flash-triton / flash-mosaic: P3 (causal, B=4, S=4096, 32 heads, head_dim 128, bf16), ours.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import decode_inputs
from pallas_kernels.flash_attention import flash_attention_dense, gpu, mosaic_gpu
from pallas_kernels.paged_attention import gpu as decode_gpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kernel", choices=["decode", "flash-triton", "flash-mosaic"])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.kernel == "decode":
        inputs = decode_inputs(rng, batch=64, context=2048, num_heads=32, num_kv_heads=8, head_dim=128,
                               page_size=args.page_size, dtype=jnp.bfloat16, sets=1)[0]
        fn = jax.jit(lambda *a: decode_gpu.paged_attention(*a, scale=128 ** -0.5))
    else:
        # Drawn on the host, so the kernel's calls are the only launches (--launch-skip counts them).
        inputs = [jax.device_put(rng.standard_normal((4, 4096, 32, 128), dtype=np.float32).astype(jnp.bfloat16))
                  for _ in range(3)]
        if args.kernel == "flash-mosaic":
            fn = jax.jit(lambda q, k, v: mosaic_gpu.flash_attention_dense(q, k, v, scale=128 ** -0.5))
        else:
            fn = jax.jit(lambda q, k, v: flash_attention_dense(q, k, v, kernel=gpu.flash_attention,
                                                               scale=128 ** -0.5))
    for _ in range(args.calls):
        jax.block_until_ready(fn(*inputs))


if __name__ == "__main__":
    main()
