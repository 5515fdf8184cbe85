"""Paged decode attention on TPUs: Pallas with the Mosaic TPU lowering.

Grid (B, K, num_splits), as on the GPU. The pages stay in HBM (memory_space ANY); program
(b, h, s) copies pages_per_block pages of K and V at a time into a double buffer in VMEM with
async DMAs, starting block j + 1 before computing block j, and runs an online softmax over
the G query heads of kv head h ([G, H] tile, full second-minor dim). Sequence lengths and the
flattened block table are scalar-prefetched into SMEM, where the DMA addresses are computed.
Slots past a sequence's last page are never read (page 0 is copied instead) and tokens outside
the visible range are masked after the copy, so NaN in the cache cannot reach the result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import (check_block_sizes, check_decode_inputs, check_options, merge_splits,
                                   page_blocks)
from pallas_kernels.paged_attention.tuned_block_sizes import (TpuDecodeBlockSizes,
                                                              tpu_decode_block_sizes)

LANES = 128  # per-row statistics are stored lane-replicated, the layout Mosaic tiles natively


def interpret_params(interpret):
    """interpret=True selects the TPU interpret mode (simulated DMAs and semaphores)."""
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


def query_tile_call(kernel, q_tkgh, *, block_q, kv_buffer, num_scalar_prefetch, out_dtype, interpret, name):
    """pallas_call over a (kv head, query tile) grid for kernels that stream K and V from HBM.

    q_tkgh [T, K, G, H] with T a multiple of block_q; each program owns a [block_q, G, H] tile
    of one kv head. K and V stay in HBM (the kernel copies them itself into two kv_buffer
    double buffers with a (2, 2) DMA semaphore array); a float32 [block_q, G, H] accumulator
    is the last scratch. Returns the call, to be applied to the scalar-prefetch operands, q,
    then K and V.
    """
    num_tokens, num_kv_heads, group, head_dim = q_tkgh.shape
    q_spec = pl.BlockSpec((block_q, None, group, head_dim), lambda h, i, *_: (i, h, 0, 0))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=num_scalar_prefetch,
            grid=(num_kv_heads, num_tokens // block_q),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=[kv_buffer, kv_buffer, pltpu.SemaphoreType.DMA((2, 2)),
                            pltpu.VMEM((block_q, group, head_dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q_tkgh.shape, out_dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params(interpret),
        name=name,
    )


class PageBlockCopy:
    """Async copies of the K and V pages of one block of table slots into one buffer slot."""

    def __init__(self, k_hbm, v_hbm, k_buf, v_buf, sems, tables_ref, *, table_row, pages_per_table,
                 h, slot0, end_slot, buffer):
        num_pages = k_hbm.shape[1]
        self._copies = []
        for i in range(k_buf.shape[1]):
            # Slots past the sequence's last page copy page 0 (never a poisoned id).
            slot = slot0 + i
            entry = tables_ref[table_row * pages_per_table + jnp.clip(slot, 0, pages_per_table - 1)]
            page = jnp.clip(jnp.where(slot < end_slot, entry, 0), 0, num_pages - 1)
            self._copies.append(pltpu.make_async_copy(k_hbm.at[h, page], k_buf.at[buffer, i],
                                                      sems.at[buffer, 0]))
            self._copies.append(pltpu.make_async_copy(v_hbm.at[h, page], v_buf.at[buffer, i],
                                                      sems.at[buffer, 1]))

    def start(self):
        for copy in self._copies:
            copy.start()

    def wait(self):
        for copy in self._copies:
            copy.wait()


def flash_block(carry, q, k, v, visible, *, scale, logit_softcap):
    """One online-softmax step in natural log: q [M, H], k, v [BK, H], visible [M, BK]."""
    acc, m, l = carry
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    s = jnp.where(visible, s, -jnp.inf)
    m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next)
    l = l * alpha + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return acc * alpha + pv, m_next, l


def softmax_state(rows, head_dim):
    """A fresh online-softmax carry (acc [rows, H], running max [rows, 1], sum [rows, 1])."""
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows, 1), M_INIT, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))


def store_heads(out_acc, carries, rows_mask):
    """Each query head g's normalised output into out_acc[:, g, :] on the rows where rows_mask
    [BQ, 1] is set; a row that saw no key stays 0 rather than 0 / 0."""
    for g, (acc, _, l) in enumerate(carries):
        out = acc / jnp.where(l == 0, 1.0, l)
        out_acc[:, g, :] = jnp.where(rows_mask, out, out_acc[:, g, :])


def pages_in_range(k_buf, v_buf, buffer, slot0, page_size, kv_lo, kv_hi):
    """The block's K, V [BK, H] from the buffer, values outside [kv_lo, kv_hi) zeroed, and the
    positions of its keys [1, BK]."""
    _, pages, _, head_dim = k_buf.shape
    block_k = pages * page_size
    k = k_buf[buffer].reshape(block_k, head_dim)
    v = v_buf[buffer].reshape(block_k, head_dim)
    col = slot0 * page_size + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
    v = jnp.where((col >= kv_lo) & (col < kv_hi), v, jnp.zeros_like(v))  # 0 * NaN = NaN
    k_pos = slot0 * page_size + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    return k, v, k_pos


# Running-max start: finite, so exp(m_prev - m_next) is never inf - inf.
M_INIT = -1e30


def double_buffered_loop(block_lo, block_hi, block_copy, compute, init):
    """fori_loop over page blocks [block_lo, block_hi) with block j + 1's DMA in flight while
    block j is computed. block_copy(j, buffer) -> PageBlockCopy; compute(j, buffer, carry)."""
    @pl.when(block_lo < block_hi)
    def _():
        block_copy(block_lo, 0).start()

    def body(j, carry):
        buffer = (j - block_lo) % 2

        @pl.when(j + 1 < block_hi)
        def _():
            block_copy(j + 1, 1 - buffer).start()

        block_copy(j, buffer).wait()
        return compute(j, buffer, carry)

    return lax.fori_loop(block_lo, block_hi, body, init)


def _decode_kernel(seq_lens_ref, tables_ref, q_ref, k_hbm, v_hbm, *refs, scale, sliding_window,
                   logit_softcap, pages_per_table, num_splits):
    *out_refs, k_buf, v_buf, sems = refs
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pages_per_block, page_size = k_buf.shape[1], k_buf.shape[2]
    group, head_dim = q_ref.shape
    seq_len = jnp.minimum(seq_lens_ref[b], pages_per_table * page_size)
    first = jnp.int32(0) if sliding_window is None else jnp.maximum(seq_len - sliding_window, 0)
    first_slot, end_slot, num_blocks = page_blocks(first, seq_len, page_size, pages_per_block)
    per_split = (num_blocks + num_splits - 1) // num_splits
    block_lo = split * per_split
    block_hi = jnp.minimum(block_lo + per_split, num_blocks)

    def block_copy(j, buffer):
        return PageBlockCopy(k_hbm, v_hbm, k_buf, v_buf, sems, tables_ref,
                             table_row=b, pages_per_table=pages_per_table, h=h,
                             slot0=first_slot + j * pages_per_block, end_slot=end_slot, buffer=buffer)

    q = q_ref[...]

    def compute(j, buffer, carry):
        slot0 = first_slot + j * pages_per_block
        k, v, k_pos = pages_in_range(k_buf, v_buf, buffer, slot0, page_size, first, seq_len)
        visible = jnp.broadcast_to((k_pos >= first) & (k_pos < seq_len), (group, k.shape[0]))
        return flash_block(carry, q, k, v, visible, scale=scale, logit_softcap=logit_softcap)

    init = softmax_state(group, head_dim)
    acc, m, l = double_buffered_loop(block_lo, block_hi, block_copy, compute, init)
    safe_l = jnp.where(l == 0, 1.0, l)
    if num_splits == 1:
        (o_ref,) = out_refs
        o_ref[...] = (acc / safe_l).astype(o_ref.dtype)
        return
    o_ref, lse_ref = out_refs
    o_ref[...] = acc / safe_l
    lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(safe_l))
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logit_softcap",
                                             "block_sizes", "interpret"))
def paged_attention(q, k_pages, v_pages, block_tables, seq_lens, *, scale, sliding_window=None,
                    logit_softcap=None, block_sizes: TpuDecodeBlockSizes | None = None,
                    interpret=False):
    """Paged decode attention (TPU kernel). Arguments as in pallas_kernels.paged_attention.gpu.

    block_sizes: TpuDecodeBlockSizes; defaults from tuned_block_sizes.
    interpret: True (or a pltpu.InterpretParams) runs the TPU interpret mode on any backend.
    """
    num_kv_heads, page_size = check_decode_inputs(q, k_pages, v_pages, block_tables, seq_lens)
    check_options(scale, sliding_window, logit_softcap)
    batch, num_heads, head_dim = q.shape
    pages_per_seq = block_tables.shape[1]
    if block_sizes is None:
        block_sizes = tpu_decode_block_sizes(page_size=page_size, pages_per_seq=pages_per_seq)
    check_block_sizes(block_sizes, TpuDecodeBlockSizes)

    group = num_heads // num_kv_heads
    splits = block_sizes.num_splits
    q_bkgh = q.reshape(batch, num_kv_heads, group, head_dim)
    kernel = functools.partial(
        _decode_kernel, scale=float(scale), sliding_window=sliding_window,
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
        pages_per_table=pages_per_seq, num_splits=splits)
    q_spec = pl.BlockSpec((None, None, group, head_dim), lambda b, h, s, *_: (b, h, 0, 0))
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q_bkgh.shape, q.dtype)]
        out_specs = [q_spec]
    else:
        out_shape = [jax.ShapeDtypeStruct((batch, num_kv_heads, splits, group, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((batch, num_kv_heads, splits, group, LANES), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, group, n), lambda b, h, s, *_: (b, h, s, 0, 0))
                     for n in (head_dim, LANES)]
    buf = pltpu.VMEM((2, block_sizes.pages_per_block, page_size, head_dim), k_pages.dtype)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, num_kv_heads, splits),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=out_specs,
            scratch_shapes=[buf, buf, pltpu.SemaphoreType.DMA((2, 2))]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret_params(interpret),
        name="paged_decode_attention",
    )(seq_lens, block_tables.reshape(-1), q_bkgh, k_pages, v_pages)
    if splits == 1:
        return outs[0].reshape(q.shape)
    o_parts = jnp.moveaxis(outs[0], 2, 1).reshape(batch, splits, num_heads, head_dim)
    lse = jnp.moveaxis(outs[1][..., 0], 2, 1).reshape(batch, splits, num_heads)
    return merge_splits(o_parts, lse, q.dtype)
