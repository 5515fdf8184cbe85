"""Skinny (decode) matmul y[T, N] = x[T, K] @ w[K, N] for few tokens: a GPU kernel (Pallas,
Triton lowering) that reads the weight once at memory speed, also from a stacked [L, K, N]
weight with a traced layer index (optionally the MLP's gated product in its epilogue, or
split-K partials left unsummed), and a pure-jnp reference."""

from __future__ import annotations

from pallas_kernels.matmul import gpu
from pallas_kernels.matmul.gpu import skinny_matmul
from pallas_kernels.matmul.reference import skinny_matmul_reference
from pallas_kernels.matmul.tuned_block_sizes import GpuMatmulBlockSizes, gpu_matmul_block_sizes

__all__ = ["skinny_matmul", "skinny_matmul_reference", "GpuMatmulBlockSizes", "gpu_matmul_block_sizes",
           "gpu"]
