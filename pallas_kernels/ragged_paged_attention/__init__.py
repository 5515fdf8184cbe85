"""Ragged paged attention (prefill chunks and decodes in one launch): a GPU kernel (Pallas,
Triton lowering), a TPU kernel (Pallas, Mosaic TPU lowering) and a pure-jnp reference. See
docs/kernels.md."""

from __future__ import annotations

import jax

from pallas_kernels.ragged_paged_attention import gpu, tpu
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.tuned_block_sizes import (GpuRaggedBlockSizes,
                                                                     TpuRaggedBlockSizes)

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference", "GpuRaggedBlockSizes",
           "TpuRaggedBlockSizes", "gpu", "tpu"]


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                           interpret=False, **kwargs):
    """The kernel for the default backend (TPU, GPU, or the GPU kernel in interpret mode
    elsewhere when interpret=True). Arguments as in gpu.ragged_paged_attention."""
    args = (q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs)
    backend = jax.default_backend()
    if backend == "tpu":
        return tpu.ragged_paged_attention(*args, interpret=interpret, **kwargs)
    if backend in ("gpu", "cuda", "rocm") or interpret:
        return gpu.ragged_paged_attention(*args, interpret=interpret, **kwargs)
    raise ValueError(f"no ragged paged attention kernel compiles for backend {backend!r}: pass "
                     "interpret=True or use ragged_paged_attention_reference")
