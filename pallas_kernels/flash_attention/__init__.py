"""Flash attention for prefill: a variable-length GPU kernel (Pallas, Triton lowering), a
batched-layout Hopper kernel (Pallas, Mosaic GPU lowering), a TPU kernel (Pallas, Mosaic TPU
lowering) and a pure-jnp reference. See docs/kernels.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import gpu, mosaic_gpu, tpu
from pallas_kernels.flash_attention.reference import flash_attention_reference
from pallas_kernels.flash_attention.tuned_block_sizes import (GpuFlashBlockSizes, MosaicFlashBlockSizes,
                                                              TpuFlashBlockSizes)

__all__ = ["flash_attention", "flash_attention_dense", "flash_attention_reference", "GpuFlashBlockSizes",
           "MosaicFlashBlockSizes", "TpuFlashBlockSizes", "gpu", "mosaic_gpu", "tpu"]


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


def flash_attention_dense(q, k, v, *, kernel=None, **kwargs):
    """Batched layout: q [B, S, N, H], k, v [B, S, K, H] -> [B, S, N, H], every sequence S long.

    With no `kernel`, a Hopper GPU runs the Mosaic GPU kernel (mosaic_gpu.py) where it takes
    the inputs (bf16/fp16, S a multiple of its tiles, no Triton block_sizes given). Otherwise
    the batch is packed along T (a free reshape) with cu_seq_lens = [0, S, 2S, ..., BS] and
    `kernel` (default flash_attention; or gpu.flash_attention, tpu.flash_attention, the
    reference) is called with the remaining keyword arguments.
    """
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q must be [B, S, N, H] and k [B, S, K, H], got shapes {q.shape} and {k.shape}")
    if kernel is None:
        if (not kwargs.get("interpret") and kwargs.get("block_sizes") is None and mosaic_gpu.is_supported_device()
                and mosaic_gpu.applies(q, k, v, sliding_window=kwargs.get("sliding_window"),
                                       logit_softcap=kwargs.get("logit_softcap"))):
            return mosaic_gpu.flash_attention_dense(q, k, v, **kwargs)
        kernel = flash_attention
    b, s = q.shape[:2]
    cu = jnp.arange(b + 1, dtype=jnp.int32) * s
    out = kernel(q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]),
                 v.reshape(b * s, *v.shape[2:]), cu, **kwargs)
    return out.reshape(q.shape)
