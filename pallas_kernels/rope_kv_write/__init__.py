"""Finishing a fused q|k|v projection: split-K sum, rotary embedding of q and k, and the write
of k and v into one layer of the stacked paged pools, as one GPU kernel (Pallas, Triton
lowering) and a pure-jnp reference."""

from __future__ import annotations

from pallas_kernels.rope_kv_write.gpu import fusable_head_size, rope_kv_write
from pallas_kernels.rope_kv_write.reference import rope_kv_write_reference, rotate_half_rope

__all__ = ["fusable_head_size", "rope_kv_write", "rope_kv_write_reference", "rotate_half_rope"]
