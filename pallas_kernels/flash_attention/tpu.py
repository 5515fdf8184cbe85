"""Variable-length flash attention (prefill) on TPUs: Pallas with the Mosaic TPU lowering.

Grid (K, cdiv(T, BQ)): program (h, i) owns query rows [i * BQ, (i + 1) * BQ) of kv head h
(q viewed as [T, K, G, H], block [BQ, G, H]) and visits every sequence whose rows overlap the
block, found by a binary search over the scalar-prefetched cu_seq_lens (as the ragged kernel
does). K and V stay in HBM; for each sequence the program copies the key rows its queries can
see (causal, windowed if asked) block_k rows at a time into a VMEM double buffer with async
DMAs (block j + 1 in flight while block j is computed) and runs an online softmax per query
head over [BQ, H] row tiles, sharing each K, V block among the G heads. Rows of the block
outside the sequence are masked; when the sequence is done its rows are merged into the
block's output accumulator, so padding rows stay zero.

A copy of block_k rows starting near the end of T is moved back to end at T (K, V have at
least block_k rows: the wrapper pads shorter inputs), and its keys are masked to the block's
own range, so no key is counted twice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import check_block_sizes
from pallas_kernels.flash_attention.reference import check_flash_inputs
from pallas_kernels.flash_attention.tuned_block_sizes import TpuFlashBlockSizes, tpu_flash_block_sizes
from pallas_kernels.paged_attention.tpu import (PageBlockCopy, double_buffered_loop, flash_block, query_tile_call,
                                                softmax_state, store_heads)
from pallas_kernels.ragged_paged_attention.tpu import first_overlapping_sequence


class RowBlockCopy(PageBlockCopy):
    """Async copies of key rows [start, start + block_k) of kv head h (K and V) into a buffer;
    start() and wait() as for pages."""

    def __init__(self, k_hbm, v_hbm, k_buf, v_buf, sems, *, h, start, buffer):  # noqa: D107
        rows = pl.ds(start, k_buf.shape[1])
        self._copies = [pltpu.make_async_copy(k_hbm.at[rows, h], k_buf.at[buffer], sems.at[buffer, 0]),
                        pltpu.make_async_copy(v_hbm.at[rows, h], v_buf.at[buffer], sems.at[buffer, 1])]


def _flash_kernel(cu_ref, q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sems, out_acc, *, scale, causal,
                  sliding_window, logit_softcap, num_seqs, search_steps):
    h, i = pl.program_id(0), pl.program_id(1)
    bq, group, head_dim = q_ref.shape
    block_k = k_buf.shape[1]
    kv_rows = k_hbm.shape[0]
    row_start = i * bq
    row_end = row_start + bq
    out_acc[...] = jnp.zeros_like(out_acc)
    row = row_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)

    def visit(seq):
        q_begin, q_end = cu_ref[seq], cu_ref[seq + 1]
        seq_len = q_end - q_begin
        in_seq = (row >= q_begin) & (row < q_end)
        q_pos = row - q_begin  # [BQ, 1]
        p_first = jnp.maximum(q_begin, row_start) - q_begin
        p_last = jnp.minimum(q_end, row_end) - 1 - q_begin
        kv_hi = jnp.minimum(p_last + 1, seq_len) if causal else seq_len
        kv_lo = jnp.int32(0)
        if sliding_window is not None:
            kv_lo = jnp.maximum(p_first - sliding_window + 1, 0)
        num_blocks = pl.cdiv(jnp.maximum(kv_hi - kv_lo, 0), block_k)

        def start_row(j):
            return jnp.minimum(q_begin + kv_lo + j * block_k, kv_rows - block_k)

        def block_copy(j, buffer):
            return RowBlockCopy(k_hbm, v_hbm, k_buf, v_buf, sems, h=h, start=start_row(j), buffer=buffer)

        def compute(j, buffer, carries):
            k_lo = kv_lo + j * block_k  # this block's own key range [k_lo, k_lo + block_k)
            k_pos = start_row(j) - q_begin + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            k_ok = (k_pos >= k_lo) & (k_pos < jnp.minimum(k_lo + block_k, kv_hi))
            v = jnp.where(k_ok.reshape(block_k, 1), v_buf[buffer], jnp.zeros_like(v_buf[buffer]))
            visible = in_seq & k_ok  # 0 * NaN = NaN: values of unseen rows are zeroed above
            if causal:
                visible &= k_pos <= q_pos
            if sliding_window is not None:
                visible &= k_pos > q_pos - sliding_window
            # K and V are shared by the G query heads of this kv head.
            return tuple(flash_block(carries[g], q_ref[:, g, :], k_buf[buffer], v, visible, scale=scale,
                                     logit_softcap=logit_softcap) for g in range(group))

        init = tuple(softmax_state(bq, head_dim) for _ in range(group))
        store_heads(out_acc, double_buffered_loop(0, num_blocks, block_copy, compute, init), in_seq)
        return seq + 1

    first = first_overlapping_sequence(cu_ref, row_start, jnp.int32(num_seqs), search_steps)
    lax.while_loop(lambda s: (s < num_seqs) & (cu_ref[jnp.minimum(s, num_seqs)] < row_end), visit, first)
    o_ref[...] = out_acc[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "causal", "sliding_window", "logit_softcap",
                                             "block_sizes", "interpret"))
def flash_attention(q, k, v, cu_seq_lens, *, scale, causal=True, sliding_window=None, logit_softcap=None,
                    block_sizes: TpuFlashBlockSizes | None = None, interpret=False):
    """Variable-length flash attention (TPU kernel). Arguments as in flash_attention.gpu.

    block_sizes: TpuFlashBlockSizes; defaults from tuned_block_sizes.
    interpret: True (or a pltpu.InterpretParams) runs the TPU interpret mode on any backend.
    """
    num_kv_heads = check_flash_inputs(q, k, v, cu_seq_lens, scale=scale, sliding_window=sliding_window,
                                      logit_softcap=logit_softcap)
    num_tokens, num_heads, head_dim = q.shape
    if block_sizes is None:
        block_sizes = tpu_flash_block_sizes(num_tokens=num_tokens)
    check_block_sizes(block_sizes, TpuFlashBlockSizes)
    group = num_heads // num_kv_heads
    bq, block_k = block_sizes.block_q, block_sizes.block_k
    num_seqs = cu_seq_lens.shape[0] - 1
    padded_tokens = pl.cdiv(num_tokens, bq) * bq
    q_tkgh = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    if padded_tokens != num_tokens:  # the last block's extra rows are never read back
        q_tkgh = jnp.pad(q_tkgh, ((0, padded_tokens - num_tokens), (0, 0), (0, 0), (0, 0)))
    if num_tokens < block_k:  # every DMA copies block_k rows; extra rows are masked
        k = jnp.pad(k, ((0, block_k - num_tokens), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, block_k - num_tokens), (0, 0), (0, 0)))
    kernel = functools.partial(
        _flash_kernel, scale=float(scale), causal=bool(causal), sliding_window=sliding_window,
        logit_softcap=None if logit_softcap is None else float(logit_softcap), num_seqs=num_seqs,
        search_steps=max(1, num_seqs.bit_length()))
    out = query_tile_call(kernel, q_tkgh, block_q=bq, kv_buffer=pltpu.VMEM((2, block_k, head_dim), k.dtype),
                          num_scalar_prefetch=1, out_dtype=q.dtype, interpret=interpret,
                          name="flash_attention")(cu_seq_lens, q_tkgh, k, v)
    return out[:num_tokens].reshape(q.shape)
