"""Fused residual add and RMSNorm (y + residual, then its norm, from a projection's split-K
partials and a stacked norm weight): a GPU kernel (Pallas, Triton lowering) and a pure-jnp
reference."""

from __future__ import annotations

from pallas_kernels.rms_norm.gpu import add_rms_norm, fusable_width
from pallas_kernels.rms_norm.reference import (NORM_KINDS, add_rms_norm_reference, finish_partials,
                                               rms_norm_ordered)
from pallas_kernels.rms_norm.tuned_block_sizes import RmsNormBlockSizes, rms_norm_block_sizes

__all__ = ["add_rms_norm", "add_rms_norm_reference", "finish_partials", "fusable_width", "rms_norm_ordered",
           "NORM_KINDS", "RmsNormBlockSizes", "rms_norm_block_sizes"]
