"""Paged decode attention: a GPU kernel (Pallas, Triton lowering), a TPU kernel (Pallas, Mosaic
TPU lowering) and a pure-jnp reference. See docs/kernels.md."""

from __future__ import annotations

import jax

from pallas_kernels.paged_attention import gpu, tpu
from pallas_kernels.paged_attention.reference import paged_attention_reference
from pallas_kernels.paged_attention.tuned_block_sizes import GpuDecodeBlockSizes, TpuDecodeBlockSizes

__all__ = ["paged_attention", "paged_attention_reference", "GpuDecodeBlockSizes",
           "TpuDecodeBlockSizes", "gpu", "tpu"]


def paged_attention(q, k_pages, v_pages, block_tables, seq_lens, *, interpret=False, **kwargs):
    """The kernel for the default backend: tpu.paged_attention on TPUs, gpu.paged_attention on
    GPUs, and the GPU kernel in interpret mode elsewhere when interpret=True. Arguments as in
    gpu.paged_attention (block_sizes must suit the chosen kernel)."""
    backend = jax.default_backend()
    if backend == "tpu":
        return tpu.paged_attention(q, k_pages, v_pages, block_tables, seq_lens, interpret=interpret, **kwargs)
    if backend in ("gpu", "cuda", "rocm") or interpret:
        return gpu.paged_attention(q, k_pages, v_pages, block_tables, seq_lens, interpret=interpret, **kwargs)
    raise ValueError(f"no paged attention kernel compiles for backend {backend!r}: pass interpret=True "
                     "or use paged_attention_reference")
