"""Variable-length flash attention for prefill: a GPU kernel (Pallas, Triton lowering), a TPU
kernel (Pallas, Mosaic TPU lowering) and a pure-jnp reference. See docs/kernels.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import gpu, tpu
from pallas_kernels.flash_attention.reference import flash_attention_reference
from pallas_kernels.flash_attention.tuned_block_sizes import GpuFlashBlockSizes, TpuFlashBlockSizes

__all__ = ["flash_attention", "flash_attention_dense", "flash_attention_reference", "GpuFlashBlockSizes",
           "TpuFlashBlockSizes", "gpu", "tpu"]


def flash_attention(q, k, v, cu_seq_lens, *, interpret=False, **kwargs):
    """The kernel for the default backend (TPU, GPU, or the GPU kernel in interpret mode
    elsewhere when interpret=True). Arguments as in gpu.flash_attention."""
    backend = jax.default_backend()
    if backend == "tpu":
        return tpu.flash_attention(q, k, v, cu_seq_lens, interpret=interpret, **kwargs)
    if backend in ("gpu", "cuda", "rocm") or interpret:
        return gpu.flash_attention(q, k, v, cu_seq_lens, interpret=interpret, **kwargs)
    raise ValueError(f"no flash attention kernel compiles for backend {backend!r}: pass "
                     "interpret=True or use flash_attention_reference")


def flash_attention_dense(q, k, v, *, kernel=flash_attention, **kwargs):
    """Batched layout: q [B, S, N, H], k, v [B, S, K, H] -> [B, S, N, H], every sequence S long.

    Packs the batch along T (a free reshape) with cu_seq_lens = [0, S, 2S, ..., BS] and calls
    `kernel` (flash_attention, gpu.flash_attention, tpu.flash_attention or the reference) with
    the remaining keyword arguments.
    """
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q must be [B, S, N, H] and k [B, S, K, H], got shapes {q.shape} and {k.shape}")
    b, s = q.shape[:2]
    cu = jnp.arange(b + 1, dtype=jnp.int32) * s
    out = kernel(q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]),
                 v.reshape(b * s, *v.shape[2:]), cu, **kwargs)
    return out.reshape(q.shape)
