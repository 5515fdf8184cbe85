"""Pure-jnp reference for the grouped (mixture-of-experts) matmul, and the row-tile table that
the kernel and its callers share.

Glossary: P rows of x sorted by group (group g's rows contiguous, groups in order), G groups
(experts), K input and N output features, L stacked layers. group_sizes [G] counts each
group's rows; rows past their sum belong to no group and are not computed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import check_dtypes, layer_operand, next_power_of_2
from pallas_kernels.matmul.reference import gated_product

MIN_ROWS, MAX_ROWS = 16, 64


def rows_per_tile(num_rows: int, num_groups: int) -> int:
    """Rows of one program's tile: the expected group size rounded up to a power of 2, in
    [16, 64] (16 is the tensor-core dot's minimum). A decode step's groups hold a few rows
    each, so a tile is usually a whole group and every routed expert's weights are read once."""
    expected = -(-num_rows // max(1, num_groups))
    return min(MAX_ROWS, max(MIN_ROWS, next_power_of_2(expected)))


def max_tiles(num_rows: int, num_groups: int) -> int:
    """Upper bound on the row tiles of any grouping of num_rows rows: sum_g ceil(s_g / R) is
    at most P / R plus one per non-empty group, and at most P (a tile holds at least a row)."""
    rows = rows_per_tile(num_rows, num_groups)
    return min(num_rows, -(-num_rows // rows) + min(num_groups, num_rows))


class GroupTiles(NamedTuple):
    """The row tiles of a grouping, each int32 [max_tiles]: tile t covers rows [start[t],
    start[t] + count[t]) of group group[t]; count is 0 for tiles past the last."""
    group: jax.Array
    start: jax.Array
    count: jax.Array


def group_tiles(group_sizes, num_rows: int) -> GroupTiles:
    """Cuts each group's rows into tiles of rows_per_tile(num_rows, G) rows.

    group_sizes: int32 [G], summing to at most num_rows.
    """
    num_groups = group_sizes.shape[0]
    rows = rows_per_tile(num_rows, num_groups)
    sizes = group_sizes.astype(jnp.int32)
    tiles_g = (sizes + rows - 1) // rows
    # Prefix sums over the G groups as one compare-and-sum over [G, G] (XLA fuses it; its
    # cumsum is a reduce-window kernel of several microseconds, paid per layer at decode).
    upto = jnp.arange(num_groups)[None, :] <= jnp.arange(num_groups)[:, None]  # [g, g']: g' <= g
    tile_end_g = jnp.sum(jnp.where(upto, tiles_g[None, :], 0), axis=1)  # one past each group's last tile
    row_start_g = jnp.sum(jnp.where(upto, sizes[None, :], 0), axis=1) - sizes
    t = jnp.arange(max_tiles(num_rows, num_groups), dtype=jnp.int32)
    # group of tile t: how many groups end at or before it (a [tiles, G] compare XLA fuses)
    g = jnp.sum(t[:, None] >= tile_end_g[None, :], axis=1, dtype=jnp.int32)
    live = g < num_groups
    g = jnp.minimum(g, num_groups - 1)
    local = t - (tile_end_g[g] - tiles_g[g])
    start = row_start_g[g] + local * rows
    count = jnp.where(live, jnp.minimum(rows, sizes[g] - local * rows), 0)
    return GroupTiles(g, jnp.where(live, start, 0), count)


def check_grouped_inputs(x, w, group_sizes, layer):
    """Static checks; returns (num_rows, k, n, num_groups, layer as int32 [1] or None)."""
    if x.ndim != 2:
        raise ValueError(f"x must be [num_rows, k], got shape {x.shape}")
    if w.ndim not in (3, 4):
        raise ValueError(f"w must be [num_groups, k, n] or stacked [num_layers, num_groups, k, n], got {w.shape}")
    check_dtypes(x=x, w=w)
    if x.dtype != w.dtype:
        raise ValueError(f"x dtype {x.dtype} must equal w dtype {w.dtype}")
    num_groups, k, n = w.shape[-3:]
    if x.shape[1] != k:
        raise ValueError(f"x has k = {x.shape[1]} features but w has {k} rows (shape {w.shape})")
    if group_sizes.ndim != 1 or group_sizes.shape[0] != num_groups:
        raise ValueError(f"group_sizes must be [{num_groups}] (one per group of w), got {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")
    layer = layer_operand(layer, w.ndim == 4, f"weight [num_layers, num_groups, k, n] {w.shape}")
    return x.shape[0], k, n, num_groups, layer


@functools.partial(jax.jit, static_argnames=("activation",))
def grouped_matmul_reference(x, w, group_sizes, layer=None, *, activation: str | None = None):
    """y[p] = x[p] @ w[g(p)] (or w[layer, g(p)]) in float32 with exact float32 products, where
    g(p) is the group holding row p; rows past sum(group_sizes) are zero.

    Computed densely (every row against every group, then the row's own group selected): a
    reference for tests, not a fast path.

    Args:
      x: [P, K]; w: [G, K, N] or [L, G, K, N]; group_sizes: int [G].
      layer: int scalar (may be traced), required iff w is stacked; clamped into [0, L - 1].
      activation: None, or "silu" / "gelu_tanh" for the gated act(x @ gate) * (x @ up) of w's
        column halves gate | up.
    Returns:
      [P, N] (gated: [P, N / 2]) in x.dtype.
    """
    num_rows, _, _, num_groups, layer = check_grouped_inputs(x, w, group_sizes, layer)
    w_gkn = w if layer is None else lax.dynamic_index_in_dim(w, layer[0], axis=0, keepdims=False)
    y_gpn = jnp.einsum("pk,gkn->gpn", x.astype(jnp.float32), w_gkn.astype(jnp.float32),
                       precision=lax.Precision.HIGHEST)
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.sum(jnp.arange(num_rows)[:, None] >= ends[None, :], axis=1)  # G past the last group
    y = jnp.take_along_axis(y_gpn, jnp.minimum(row_group, num_groups - 1)[None, :, None], axis=0)[0]
    if activation is not None:
        y = gated_product(*jnp.split(y, 2, axis=-1), activation, x.dtype)
    return jnp.where((row_group < num_groups)[:, None], y, 0).astype(x.dtype)
