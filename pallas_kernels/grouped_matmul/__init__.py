"""Grouped (mixture-of-experts) matmul for decode-sized steps: a GPU kernel (Pallas, Triton
lowering) that reads only the routed groups' weights, in place from stacked expert weights
(optionally the gated product in its epilogue), its row-tile table, and a pure-jnp reference."""

from __future__ import annotations

from pallas_kernels.grouped_matmul.gpu import grouped_block_sizes, grouped_matmul
from pallas_kernels.grouped_matmul.reference import (GroupTiles, group_tiles, grouped_matmul_reference, max_tiles,
                                                     rows_per_tile)

__all__ = ["grouped_matmul", "grouped_matmul_reference", "grouped_block_sizes", "group_tiles", "GroupTiles",
           "max_tiles", "rows_per_tile"]
