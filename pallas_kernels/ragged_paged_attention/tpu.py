"""Ragged paged attention on TPUs: Pallas with the Mosaic TPU lowering.

Grid (K, cdiv(T, BQ)): program (h, i) owns query rows [i * BQ, (i + 1) * BQ) of kv head h
(q viewed as [T, K, G, H], block [BQ, G, H]) and visits every sequence whose rows overlap the
block, in order: a binary search over the scalar-prefetched cu_q_lens finds the first. For
each such sequence it walks the pages the block's rows can see (causal, windowed if asked),
copying pages_per_block pages of K and V at a time into a VMEM double buffer with async DMAs
(block j + 1 in flight while block j is computed), and runs an online softmax per query head
over [BQ, H] row tiles. Rows of the block outside the sequence are masked, and when the
sequence is done its rows are merged into the block's output accumulator, so rows past
cu_q_lens[num_seqs] stay zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import check_block_sizes, check_options, check_ragged_inputs, page_blocks
from pallas_kernels.paged_attention.tpu import (PageBlockCopy, double_buffered_loop, flash_block,
                                                pages_in_range, query_tile_call, softmax_state, store_heads)
from pallas_kernels.ragged_paged_attention.tuned_block_sizes import (TpuRaggedBlockSizes,
                                                                     tpu_ragged_block_sizes)


def first_overlapping_sequence(cu_ref, row_start, num_seqs, search_steps):
    """Smallest s in [0, num_seqs] with s == num_seqs or cu_q_lens[s + 1] > row_start."""
    lo, hi = jnp.int32(0), num_seqs
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        found = (mid >= num_seqs) | (cu_ref[jnp.minimum(mid + 1, num_seqs)] > row_start)
        active = lo < hi
        lo = jnp.where(active & ~found, mid + 1, lo)
        hi = jnp.where(active & found, mid, hi)
    return lo


def _ragged_kernel(kv_lens_ref, tables_ref, cu_ref, num_seqs_ref, q_ref, k_hbm, v_hbm, o_ref,
                   k_buf, v_buf, sems, out_acc, *, scale, sliding_window, logit_softcap,
                   pages_per_table, max_seqs, search_steps):
    h, i = pl.program_id(0), pl.program_id(1)
    bq, group, head_dim = q_ref.shape
    pages_per_block, page_size = k_buf.shape[1], k_buf.shape[2]
    num_seqs = jnp.clip(num_seqs_ref[0], 0, max_seqs)
    row_start = i * bq
    row_end = row_start + bq
    out_acc[...] = jnp.zeros_like(out_acc)
    row = row_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)

    def visit(seq):
        q_begin, q_end = cu_ref[seq], cu_ref[seq + 1]
        kv_len = jnp.minimum(kv_lens_ref[seq], pages_per_table * page_size)
        in_seq = (row >= q_begin) & (row < q_end)
        q_pos = kv_len - (q_end - row)  # [BQ, 1]
        first_row = jnp.maximum(q_begin, row_start)
        last_row = jnp.minimum(q_end, row_end) - 1
        kv_hi = kv_len - (q_end - last_row) + 1
        kv_lo = jnp.int32(0)
        if sliding_window is not None:
            kv_lo = jnp.maximum(kv_len - (q_end - first_row) - sliding_window + 1, 0)
        first_slot, end_slot, num_blocks = page_blocks(kv_lo, kv_hi, page_size, pages_per_block)

        def block_copy(j, buffer):
            return PageBlockCopy(k_hbm, v_hbm, k_buf, v_buf, sems, tables_ref, table_row=seq,
                                 pages_per_table=pages_per_table, h=h,
                                 slot0=first_slot + j * pages_per_block, end_slot=end_slot,
                                 buffer=buffer)

        def compute(j, buffer, carries):
            slot0 = first_slot + j * pages_per_block
            k, v, k_pos = pages_in_range(k_buf, v_buf, buffer, slot0, page_size, kv_lo, kv_hi)
            visible = in_seq & (k_pos <= q_pos)
            if sliding_window is not None:
                visible &= k_pos > q_pos - sliding_window
            # K and V are shared by the G query heads of this kv head.
            return tuple(flash_block(carries[g], q_ref[:, g, :], k, v, visible, scale=scale,
                                     logit_softcap=logit_softcap) for g in range(group))

        init = tuple(softmax_state(bq, head_dim) for _ in range(group))
        store_heads(out_acc, double_buffered_loop(0, num_blocks, block_copy, compute, init), in_seq)
        return seq + 1

    first = first_overlapping_sequence(cu_ref, row_start, num_seqs, search_steps)
    lax.while_loop(lambda s: (s < num_seqs) & (cu_ref[jnp.minimum(s, max_seqs)] < row_end), visit,
                   first)
    o_ref[...] = out_acc[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logit_softcap",
                                             "block_sizes", "interpret"))
def ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                           scale, sliding_window=None, logit_softcap=None,
                           block_sizes: TpuRaggedBlockSizes | None = None, interpret=False):
    """Ragged paged attention (TPU kernel). Arguments as in ragged_paged_attention.gpu.

    block_sizes: TpuRaggedBlockSizes; defaults from tuned_block_sizes.
    interpret: True (or a pltpu.InterpretParams) runs the TPU interpret mode on any backend.
    """
    num_kv_heads, page_size, num_seqs = check_ragged_inputs(
        q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs)
    check_options(scale, sliding_window, logit_softcap)
    num_tokens, num_heads, head_dim = q.shape
    max_seqs, pages_per_seq = block_tables.shape
    if block_sizes is None:
        block_sizes = tpu_ragged_block_sizes(page_size=page_size, pages_per_seq=pages_per_seq)
    check_block_sizes(block_sizes, TpuRaggedBlockSizes)
    group = num_heads // num_kv_heads
    bq = block_sizes.queries_per_block
    padded_tokens = pl.cdiv(num_tokens, bq) * bq
    q_tkgh = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    if padded_tokens != num_tokens:  # the last block's extra rows are never read back
        q_tkgh = jnp.pad(q_tkgh, ((0, padded_tokens - num_tokens), (0, 0), (0, 0), (0, 0)))
    kernel = functools.partial(
        _ragged_kernel, scale=float(scale), sliding_window=sliding_window,
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
        pages_per_table=pages_per_seq, max_seqs=max_seqs,
        search_steps=max(1, max_seqs.bit_length()))
    buf = pltpu.VMEM((2, block_sizes.pages_per_block, page_size, head_dim), k_pages.dtype)
    out = query_tile_call(kernel, q_tkgh, block_q=bq, kv_buffer=buf, num_scalar_prefetch=4, out_dtype=q.dtype,
                          interpret=interpret, name="ragged_paged_attention")(kv_lens, block_tables.reshape(-1), cu_q_lens, num_seqs, q_tkgh, k_pages, v_pages)
    return out[:num_tokens].reshape(q.shape) if padded_tokens != num_tokens else out.reshape(q.shape)
