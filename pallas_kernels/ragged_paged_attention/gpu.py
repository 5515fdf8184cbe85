"""Ragged paged attention on GPUs: Pallas with the Triton lowering.

One launch serves a mixed batch: prefill chunks and decodes packed in T query rows. A program
holds BQ query tokens of one sequence x the Gp query heads of one kv head as one [BQ * Gp, H]
tile (Gp = G rounded up to a power of 2; masked load, pad heads and rows outside the sequence
are never stored) and walks the pages its rows can see (causal, and windowed if asked) with
the decode kernel's online softmax.

A decode wants a small tile (its KV is read once, the rows are padding) and a prefill chunk a
large one (its KV is re-read once per query tile, from L2, and its dots want a large M), so
the grid has two parts, each with its own static tile:
  * long rows, first so that the long-running programs start early: sequences with more than
    short_query_len queries, in tiles of queries_per_block. Sequence s owns grid rows from
    cu_q_lens[s] // BQ + s on, which leaves room for its cdiv(q_len, BQ) tiles whatever the
    alignment, so a program finds its sequence by a binary search over cu_q_lens (no host
    schedule; num_seqs stays dynamic). Rows past cu_q_lens[num_seqs] form a last
    pseudo-sequence with no keys, whose programs write zeros.
  * short rows, one per sequence: sequences with at most short_query_len queries in one tile.
Programs a sequence does not need exit at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (check_block_sizes, check_options, check_ragged_inputs, layer_operand,
                                   next_power_of_2, pad_head_dims, page_blocks)
from pallas_kernels.paged_attention.gpu import (MIN_DOT_DIM, cache_operands, flash_over_pages, gpu_head_dim,
                                               normalise)
from pallas_kernels.ragged_paged_attention.tuned_block_sizes import (GpuRaggedBlockSizes,
                                                                     gpu_ragged_block_sizes)


def find_sequence(cu_ref, query_block, num_seqs, queries_per_block, search_steps):
    """Largest s in [0, num_seqs] whose first grid row cu_q_lens[s] // BQ + s <= query_block."""
    def first_row(s):
        return cu_ref[s] // queries_per_block + s

    lo, hi = jnp.int32(0), num_seqs
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        ok = first_row(mid) <= query_block
        lo = jnp.where(ok, mid, lo)
        hi = jnp.where(ok, hi, mid - 1)
    return lo, first_row(lo)


def attend_tile(q_ref, k_ref, v_ref, o_ref, tables_ref, *, h, table_row, q0, q_end, kv_len, bq,
                page_size, pages_per_block, group, group_pad, scale, sliding_window, logit_softcap,
                layer_pages, page_offset):
    """Attention for query rows [q0, min(q0 + bq, q_end)) of one sequence and kv head h."""
    num_tokens = q_ref.shape[0]
    head_dim = k_ref.shape[-1]
    rows = bq * group_pad
    r = lax.broadcasted_iota(jnp.int32, (rows,), 0)
    token = q0 + r // group_pad
    row_ok = (token < q_end) & (token < num_tokens) & (r % group_pad < group)
    # A query at token t sits at position kv_len - (q_end - t) of its sequence.
    q_pos = kv_len - (q_end - token)
    kv_hi = jnp.where(q0 < q_end, kv_len - q_end + jnp.minimum(q0 + bq, q_end), 0)
    kv_lo = jnp.int32(0)
    if sliding_window is not None:
        kv_lo = jnp.maximum(kv_len - (q_end - q0) - sliding_window + 1, 0)

    def visible(k_pos):
        ok = row_ok[:, None] & (k_pos[None, :] <= q_pos[:, None])
        if sliding_window is not None:
            ok &= k_pos[None, :] > q_pos[:, None] - sliding_window
        return ok

    tile_mask = jnp.broadcast_to(row_ok.reshape(bq, group_pad, 1), (bq, group_pad, head_dim))
    tile = (pl.ds(q0, bq), pl.ds(h * group, group_pad), slice(None))
    q = plgpu.load(q_ref.at[tile], mask=tile_mask, other=0).reshape(rows, head_dim)
    acc, _, l = flash_over_pages(
        q, k_ref, v_ref, tables_ref, table_row, kv_lo=kv_lo, kv_hi=kv_hi,
        pages_per_block=pages_per_block, page_size=page_size, block_lo=0,
        block_hi=page_blocks(kv_lo, kv_hi, page_size, pages_per_block)[2], visible_fn=visible,
        scale=scale, logit_softcap=logit_softcap, layer_pages=layer_pages, page_offset=page_offset)
    out = normalise(acc, l).astype(o_ref.dtype).reshape(bq, group_pad, head_dim)
    plgpu.store(o_ref.at[tile], out, mask=tile_mask)


def _ragged_kernel(kv_lens_ref, tables_ref, cu_ref, num_seqs_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, *,
                   block_sizes: GpuRaggedBlockSizes, num_long_rows, search_steps, num_layers, **tile_kw):
    row, h = pl.program_id(0), pl.program_id(1)
    # The layer's pages within the stacked pools (one layer: offset 0); clamped, never a bad address.
    page_offset = jnp.clip(layer_ref[0], 0, num_layers - 1) * tile_kw["layer_pages"]
    max_seqs, table_slots = tables_ref.shape
    num_tokens = q_ref.shape[0]
    max_kv = table_slots * tile_kw["page_size"]
    short_len = block_sizes.short_query_len
    num_seqs = jnp.clip(num_seqs_ref[0], 0, max_seqs)

    def seq_bounds(seq):
        is_pad = seq == num_seqs
        q_end = jnp.where(is_pad, num_tokens, cu_ref[jnp.minimum(seq + 1, max_seqs)])
        kv_len = jnp.where(is_pad, 0, jnp.minimum(kv_lens_ref[jnp.minimum(seq, max_seqs - 1)], max_kv))
        return cu_ref[seq], q_end, kv_len, is_pad

    def long_tile():
        bq = block_sizes.queries_per_block
        seq, seq_first_row = find_sequence(cu_ref, row, num_seqs, bq, search_steps)
        q_begin, q_end, kv_len, is_pad = seq_bounds(seq)
        q0 = q_begin + (row - seq_first_row) * bq
        # Short sequences are the short rows' work; the padding pseudo-sequence is always ours.
        q0 = jnp.where(is_pad | (q_end - q_begin > short_len), q0, q_end)
        attend_tile(q_ref, k_ref, v_ref, o_ref, tables_ref, h=h,
                    table_row=jnp.minimum(seq, max_seqs - 1), q0=q0, q_end=q_end, kv_len=kv_len,
                    bq=bq, pages_per_block=block_sizes.pages_per_block, page_offset=page_offset, **tile_kw)

    def short_tile():
        seq = jnp.minimum(row - num_long_rows, num_seqs)
        q_begin, q_end, kv_len, is_pad = seq_bounds(seq)
        q0 = jnp.where(~is_pad & (q_end - q_begin <= short_len), q_begin, q_end)
        attend_tile(q_ref, k_ref, v_ref, o_ref, tables_ref, h=h,
                    table_row=jnp.minimum(seq, max_seqs - 1), q0=q0, q_end=q_end, kv_len=kv_len,
                    bq=short_len, pages_per_block=block_sizes.short_pages_per_block, page_offset=page_offset,
                    **tile_kw)

    lax.cond(row < num_long_rows, long_tile, short_tile)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logit_softcap",
                                             "block_sizes", "interpret"))
def ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, layer=None, *,
                           scale, sliding_window=None, logit_softcap=None,
                           block_sizes: GpuRaggedBlockSizes | None = None, interpret: bool = False):
    """Ragged paged attention (GPU kernel): prefill chunks and decodes in one launch.

    Args:
      q: [T, N, H], any head size H (padded to `gpu_head_dim(H)` lanes inside; see
        common.pad_head_dims); sequence s owns rows cu_q_lens[s]:cu_q_lens[s + 1], the last q_len of its
        kv_lens[s] cached tokens (this step's k, v already written), causal inside the chunk.
      k_pages, v_pages: [K, num_pages, page_size, H or gpu_head_dim(H)] paged cache (already
        padded: no copy), or every layer's pools stacked [K, L, num_pages, page_size, H] with
        `layer`: the tables then address that layer's pages, read in place (no per-layer
        offset of the tables, no slice of the pools).
      layer: int32 scalar (may be traced), required iff the pools are stacked; clamped into range.
      kv_lens: [S] int32. block_tables: [S, P] int32 (slots past a sequence's last page may
        hold anything). cu_q_lens: [S + 1] int32, non-decreasing, cu_q_lens[0] = 0.
      num_seqs: int32 scalar or [1] (dynamic): sequences in use.
      scale, sliding_window, logit_softcap: as in paged_attention.
      block_sizes: tiling; defaults from tuned_block_sizes for this device.
      interpret: run the kernel in Pallas interpret mode.
    Returns:
      [T, N, H] in q.dtype; rows past cu_q_lens[num_seqs] are zeros.
    """
    stacked = k_pages.ndim == 5
    layer = layer_operand(layer, stacked, f"pools {k_pages.shape}")
    num_layers, layer_pages = k_pages.shape[1:3] if stacked else (1, k_pages.shape[1])
    if stacked:  # a free reshape: a kv head's layers are contiguous
        k_pages, v_pages = (x.reshape(x.shape[0], -1, *x.shape[3:]) for x in (k_pages, v_pages))
    else:
        layer = jnp.zeros((1,), jnp.int32)
    q, k_pages, v_pages, true_head_dim = pad_head_dims(q, k_pages, v_pages, gpu_head_dim(q.shape[-1]))
    num_kv_heads, page_size, num_seqs = check_ragged_inputs(
        q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, fp8_cache=True)
    check_options(scale, sliding_window, logit_softcap)
    num_tokens, num_heads, head_dim = q.shape
    max_seqs = block_tables.shape[0]
    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of 2 for the Triton lowering, got {page_size}")
    if block_sizes is None:
        block_sizes = gpu_ragged_block_sizes(group=group, head_dim=head_dim, page_size=page_size,
                                             dtype=q.dtype,
                                             device_kind="interpret" if interpret else None)
    check_block_sizes(block_sizes, GpuRaggedBlockSizes)
    for name in ("short_query_len", "queries_per_block"):
        tile_rows = getattr(block_sizes, name) * group_pad
        if tile_rows < MIN_DOT_DIM:
            raise ValueError(
                f"{name} {getattr(block_sizes, name)} x padded query heads per kv head {group_pad} = "
                f"{tile_rows} tile rows; the tensor cores need at least {MIN_DOT_DIM}")
    for name in ("pages_per_block", "short_pages_per_block"):
        if getattr(block_sizes, name) * page_size < MIN_DOT_DIM:
            raise ValueError(f"{name} x page_size = {getattr(block_sizes, name) * page_size} tokens "
                             f"per step; the tensor-core dots need at least {MIN_DOT_DIM}")
        if getattr(block_sizes, name) * page_size > 4096:
            raise ValueError(f"{name} x page_size = {getattr(block_sizes, name) * page_size} "
                             "tokens per step is over 4096")
    num_long_rows = pl.cdiv(num_tokens, block_sizes.queries_per_block) + max_seqs
    kernel = functools.partial(
        _ragged_kernel, block_sizes=block_sizes, num_long_rows=num_long_rows,
        search_steps=max(1, max_seqs.bit_length()), scale=float(scale),
        sliding_window=sliding_window,
        logit_softcap=None if logit_softcap is None else float(logit_softcap), group=group,
        group_pad=group_pad, page_size=page_size, num_layers=num_layers, layer_pages=layer_pages)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)

    k_cache, v_cache, pages_spec = cache_operands(k_pages, v_pages)
    out = pl.pallas_call(
        kernel,
        grid=(num_long_rows + max_seqs, num_kv_heads),
        in_specs=[whole(kv_lens), whole(block_tables), whole(cu_q_lens), whole(num_seqs), whole(layer), whole(q),
                  pages_spec, pages_spec],
        out_specs=whole(q),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(kv_lens, block_tables, cu_q_lens, num_seqs, layer, q, k_cache, v_cache)
    return out[..., :true_head_dim]
