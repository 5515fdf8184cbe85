"""Grouped (mixture-of-experts) matmul on GPUs for decode-sized steps: y[p] = x[p] @ w[g(p)]
for P rows sorted by group, reading only the weights of groups that have rows, each once per
row tile, in place from the stacked [L, G, K, N] expert weights.

A decode step routes each token to k of G experts, so the step must read only those experts'
weights (the floor is active-expert bytes). XLA's ragged dot on the GPU computes every group
(or copies w[layer]); this kernel is the skinny matmul's weight stream (pallas_kernels/matmul)
driven by a tile table: grid (tiles, N / block_n, split_k), program (t, j, s) takes row tile t
(`reference.group_tiles`: a group, its first row and row count, all read in the kernel),
streams columns [j * block_n, +block_n) of that group's weight rows [s * K / split_k, +K /
split_k) and writes its rows of y. Tiles past the last do nothing. Rows past sum(group_sizes)
are not written (callers mask them, see `routed_experts`); the gated product and split-K
partials behave as in the skinny kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.grouped_matmul.reference import check_grouped_inputs, group_tiles, rows_per_tile
from pallas_kernels.matmul.gpu import stream_tile, validate_block_sizes, weight_stream_call
from pallas_kernels.matmul.reference import GATED_ACTIVATIONS
from pallas_kernels.matmul.tuned_block_sizes import GpuMatmulBlockSizes, fallback_block_sizes, sm_count
from pallas_kernels.paged_attention.tuned_block_sizes import device_family


def _grouped_matmul_kernel(*refs, rows, stacked, **tile):
    if stacked:
        layer_ref, group_ref, start_ref, count_ref, x_ref, w_ref, o_ref = refs
    else:
        group_ref, start_ref, count_ref, x_ref, w_ref, o_ref = refs
    t, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    count = count_ref[t]

    @pl.when(count > 0)
    def _():
        # Clamped like lax.dynamic_index_in_dim, so a bad index is never an address.
        group = jnp.clip(group_ref[t], 0, w_ref.shape[-3] - 1)
        lead = (jnp.clip(layer_ref[0], 0, w_ref.shape[0] - 1), group) if stacked else (group,)
        start = start_ref[t]
        stream_tile(x_ref, w_ref, o_ref, lead=lead, t0=start, row_end=start + count, rows=rows, masked=True,
                    j=j, s=s, **tile)


# (device family, rows per tile, k, n (the output's), dtype, gated) -> measured tiling; the rest
# get the cost model's. H200: benchmarks/results/grouped_matmul_h200_2026-12-02_sweep.json, where
# Mixtral's down projection read 4.05 TB/s with 64-column strips against 3.57 with the model's
# 128 at one token (4.00 against 3.94 at 64 tokens); other expert shapes were within 2% of it.
_B = GpuMatmulBlockSizes
_GROUPED_TABLE = {
    ("H200", 16, 14336, 4096, "bfloat16", False): _B(64, 128, 1, 4, 4),
}


def grouped_block_sizes(*, num_rows: int, num_groups: int, k: int, n: int, dtype, gated: bool = False,
                        device_kind: str | None = None) -> GpuMatmulBlockSizes:
    """The tiling of the grouped kernel: the measured one where the table has it, else the
    skinny kernel's cost model with the expected number of row tiles along the row axis (min(P,
    G) for a decode step's tokens spread over distinct experts, P / rows for a prefill's); no
    split of K for a gated product. n is the output's width (half the weight's if gated)."""
    family = device_family(device_kind)
    rows = rows_per_tile(num_rows, num_groups)
    key = (family, rows, k, n, jnp.dtype(dtype).name, gated)
    if key in _GROUPED_TABLE:
        return _GROUPED_TABLE[key]
    # a decode step's few rows spread over distinct groups; a prefill's fill whole tiles
    expected_tiles = max(1, min(num_rows, num_groups), -(-num_rows // rows))
    return fallback_block_sizes(num_tokens=num_rows, k=k, n=n, dtype=dtype, sms=sm_count(family, device_kind),
                                rows=rows, token_blocks=expected_tiles, max_split_k=1 if gated else 32)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "activation", "sum_partials"))
def grouped_matmul(x, w, group_sizes, layer=None, *, block_sizes: GpuMatmulBlockSizes | None = None,
                   interpret: bool = False, activation: str | None = None, sum_partials: bool = True):
    """y[p] = x[p] @ w[g(p)] (w[layer, g(p)] for stacked weights), reading each routed group's
    weights once per row tile.

    Args:
      x: [P, K] rows sorted by group (group g's group_sizes[g] rows contiguous, in order).
      w: [G, K, N], or [L, G, K, N] passed whole (no copy of w[layer] is made). x's dtype.
      group_sizes: int [G], summing to at most P; rows past the sum are left unwritten.
      layer: int32 scalar, required iff w is stacked; may be traced. Clamped into range.
      block_sizes: tiling (default `grouped_block_sizes`). N (gated: N / 2) must be a multiple
        of block_n and K of block_k * split_k.
      interpret: Pallas interpret mode (CPU tests).
      activation: "silu" / "gelu_tanh": w's columns are gate | up and the result is act(x @
        gate) * (x @ up), [P, N / 2], from the epilogue (no split of K).
      sum_partials: False returns a split-K tiling's float32 partials [split_k, P, N].
    Returns:
      [P, N] (gated [P, N / 2]) in x.dtype; rows outside every group are unspecified.
    """
    num_rows, k, n, num_groups, layer = check_grouped_inputs(x, w, group_sizes, layer)
    if activation is not None and activation not in GATED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(GATED_ACTIVATIONS)}, got {activation!r}")
    out_n = n // 2 if activation is not None else n
    if block_sizes is None:
        block_sizes = grouped_block_sizes(num_rows=num_rows, num_groups=num_groups, k=k, n=out_n, dtype=x.dtype,
                                          gated=activation is not None,
                                          device_kind="interpret" if interpret else None)
    bs = block_sizes
    validate_block_sizes(bs, k, out_n)
    if activation is not None and (n % 2 or bs.split_k != 1):
        raise ValueError(f"a gated product needs an even n and split_k == 1; got n = {n}, {bs}")
    tiles = group_tiles(group_sizes, num_rows)
    rows = rows_per_tile(num_rows, num_groups)
    kernel = functools.partial(
        _grouped_matmul_kernel, rows=rows, stacked=layer is not None, block_n=bs.block_n, block_k=bs.block_k,
        steps=k // (bs.block_k * bs.split_k), split_k=bs.split_k, swap_ab=bs.swap_ab, activation=activation,
        gate_offset=out_n)
    grid = (tiles.count.shape[0], out_n // bs.block_n, bs.split_k)
    operands = (*tiles, x, w) if layer is None else (layer, *tiles, x, w)
    return weight_stream_call(kernel, operands, grid=grid, num_tokens=num_rows, n=out_n, dtype=x.dtype,
                              block_sizes=bs, interpret=interpret, name="grouped_matmul",
                              sum_partials=sum_partials)
