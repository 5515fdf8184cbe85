"""Paged decode attention on GPUs: Pallas with the Triton lowering.

Grid (B, K, num_splits). Program (b, h, s) holds the G query heads of kv head h of sequence
b as one [Gp, H] tile (Gp = G rounded up to a power of 2, at least 16 for the tensor cores;
pad rows are masked on load and store) and walks its share of the sequence's visible pages,
pages_per_block pages per step: gather the block's page ids, load the K and V token rows, and
run an online softmax in base 2 (exp2 is one instruction). The visible range, not the table, is
what gets split, so programs of one sequence get equal work whatever its length. With one
split the program writes the normalised output; with more it writes its normalised output
and log-sum-exp, merged exactly afterwards (flash-decoding).

Nothing past a sequence's visible range is used: table slots past the last page are read
under a mask, and tokens outside the range read the range's first token with a masked logit
(flash_over_pages), so NaN or stale data in the cache cannot reach the result.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (check_block_sizes, check_decode_inputs, check_options, merge_splits,
                                   next_power_of_2, page_blocks, next_power_of_2_at_least, pad_head_dims)
from pallas_kernels.paged_attention.tuned_block_sizes import (GpuDecodeBlockSizes,
                                                              gpu_decode_block_sizes)

LOG2E = math.log2(math.e)
# Running-max start: finite, so exp2(m_prev - m_next) is never inf - inf.
M_INIT = -1e30
MIN_DOT_DIM = 16  # smallest M, N or K of a tensor-core dot in Triton


def gpu_head_dim(head_dim: int) -> int:
    """The head size the Triton kernels tile: a power of 2 (Triton tensor sizes), at least
    MIN_DOT_DIM. Other sizes (40, 80, 96, ...) are zero-padded to it (common.pad_head_dims)."""
    return next_power_of_2_at_least(head_dim, MIN_DOT_DIM)


def scaled_logits(s, *, scale, logit_softcap):
    """Raw q.k -> logits in base 2 (times log2 e), soft-capped if asked."""
    if logit_softcap is None:
        return s * (scale * LOG2E)
    return jnp.tanh(s * (scale / logit_softcap)) * (logit_softcap * LOG2E)


def _dot(a, b, contract):
    # float32 inputs get exact float32 products; Triton's default for them would be TF32.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def online_softmax_step(acc, m, l, s, v):
    """One block of an online softmax in base 2: folds logits s [M, BK] (masked ones -inf) and
    values v [BK, H] into (acc [M, H] unnormalised, m [M] running max, l [M] running sum)."""
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, ((1,), (0,)))
    return acc, m_next, l


def load_block_pages(tables_ref, row, first_slot, num_slots, end_slot, num_pages, page_offset=0):
    """Page ids of slots [first_slot, first_slot + num_slots) of table row `row`, plus
    page_offset; slots at or past end_slot read as page 0 and ids are clamped into the
    num_pages pages the table addresses, so a poisoned slot is never an address."""
    slots = first_slot + lax.broadcasted_iota(jnp.int32, (num_slots,), 0)
    ids = plgpu.load(tables_ref.at[row, pl.ds(first_slot, num_slots)], mask=slots < end_slot, other=0)
    return jnp.clip(ids, 0, num_pages - 1) + page_offset


def flash_over_pages(q, k_ref, v_ref, tables_ref, table_row, *, page_size, kv_lo, kv_hi,
                     pages_per_block, block_lo, block_hi, visible_fn, scale, logit_softcap,
                     layer_pages=None, page_offset=0):
    """Online softmax of the q tile [M, H] over blocks [block_lo, block_hi) of the cache range
    [kv_lo, kv_hi) of one table row; block j starts at slot kv_lo // page_size + j * pages_per_block.

    The cache refs are token rows [num_pages * page_size, H] (the pools flattened; see
    cache_operands). A block is one gather of block_k rows straight into the dots' operand
    shape. A token outside [kv_lo, kv_hi) (the tail of the last page, slots past the table's
    end) reads the range's first token instead: finite data whose logit is masked, so its
    probability is exactly 0. The loads thus need neither a mask nor a select on the values
    (NaN or stale data elsewhere in the pool is never read), and that is what lets Triton's
    software pipeliner stage them: on the H200 this took the P4 decode from 2.07 to 4.25 TB/s
    by kernel time against the same loop over page gathers with a select on V
    (benchmarks/results/kernels_h200_2026-12-01_run*).

    visible_fn(k_pos [BK]) -> [M, BK] says which logits count, inside the range.
    layer_pages, page_offset: with stacked layers' pools, the table's ids address the
    layer_pages pages of one layer, which start at page page_offset of the refs (traced);
    by default the ids address the whole refs.
    Returns (acc [M, H] unnormalised, m [M] running max in base 2, l [M] softmax sum).
    """
    num_pages, head_dim = k_ref.shape[0] // page_size, k_ref.shape[1]
    num_pages = layer_pages or num_pages
    block_k = pages_per_block * page_size
    first_slot, end_slot, _ = page_blocks(kv_lo, kv_hi, page_size, pages_per_block)
    # Used only when the range is not empty (else the loop runs no block); clamped anyway.
    lo_slot = jnp.minimum(kv_lo // page_size, tables_ref.shape[1] - 1)
    lo_page = jnp.clip(plgpu.load(tables_ref.at[table_row, lo_slot]), 0, num_pages - 1) + page_offset
    stand_in_row = lo_page * page_size + kv_lo % page_size
    page_offsets = lax.broadcasted_iota(jnp.int32, (pages_per_block, page_size), 1)

    def body(j, carry):
        acc, m, l = carry
        slot0 = first_slot + j * pages_per_block
        ids = load_block_pages(tables_ref, table_row, slot0, pages_per_block, end_slot, num_pages, page_offset)
        k_pos = slot0 * page_size + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        in_range = (k_pos >= kv_lo) & (k_pos < kv_hi)
        rows = jnp.where(in_range, (ids[:, None] * page_size + page_offsets).reshape(block_k),
                         stand_in_row)
        k, v = k_ref[rows], v_ref[rows]
        if k.dtype != q.dtype:  # a float8 cache: upcast after the load, so the dots run in q's dtype
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = scaled_logits(_dot(q, k, ((1,), (1,))), scale=scale, logit_softcap=logit_softcap)
        s = jnp.where(in_range[None, :] & visible_fn(k_pos), s, -jnp.inf)
        return online_softmax_step(acc, m, l, s, v)

    rows = q.shape[0]
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), M_INIT, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    return lax.fori_loop(block_lo, block_hi, body, init)


def cache_operands(k_pages, v_pages):
    """The pools as the kernels read them, token rows [K, num_pages * page_size, H] (a free
    reshape of the same buffers), and the BlockSpec handing one kv head (grid axis 1) to a
    program."""
    k_rows = k_pages.reshape(k_pages.shape[0], -1, k_pages.shape[-1])
    v_rows = v_pages.reshape(v_pages.shape[0], -1, v_pages.shape[-1])
    spec = pl.BlockSpec((None, *k_rows.shape[1:]), lambda _, h, *rest: (h, 0, 0))
    return k_rows, v_rows, spec


def normalise(acc, l):
    return acc / jnp.where(l == 0, 1.0, l)[:, None]


def _decode_kernel(seq_lens_ref, tables_ref, q_ref, k_ref, v_ref, *out_refs, scale, sliding_window,
                   logit_softcap, group, group_pad, page_size, pages_per_block, num_splits):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = k_ref.shape[-1]
    seq_len = jnp.minimum(seq_lens_ref[b], tables_ref.shape[1] * page_size)
    first = jnp.int32(0) if sliding_window is None else jnp.maximum(seq_len - sliding_window, 0)
    _, _, num_blocks = page_blocks(first, seq_len, page_size, pages_per_block)
    per_split = (num_blocks + num_splits - 1) // num_splits
    block_lo = split * per_split

    rows = lax.broadcasted_iota(jnp.int32, (group_pad, head_dim), 0) < group
    head_rows = (b, pl.ds(h * group, group_pad), slice(None))
    q = plgpu.load(q_ref.at[head_rows], mask=rows, other=0)
    # The one query sees every cached token in [first, seq_len): no per-row mask.
    acc, m, l = flash_over_pages(
        q, k_ref, v_ref, tables_ref, b, kv_lo=first, kv_hi=seq_len, pages_per_block=pages_per_block,
        page_size=page_size, block_lo=block_lo, block_hi=jnp.minimum(block_lo + per_split, num_blocks),
        visible_fn=lambda k_pos: jnp.ones((group_pad, k_pos.shape[0]), jnp.bool_),
        scale=scale, logit_softcap=logit_softcap)
    out = normalise(acc, l)

    if num_splits == 1:
        (o_ref,) = out_refs
        plgpu.store(o_ref.at[head_rows], out.astype(o_ref.dtype), mask=rows)
        return
    o_ref, lse_ref = out_refs
    plgpu.store(o_ref.at[b, split, pl.ds(h * group, group_pad), :], out, mask=rows)
    # Natural-log LSE of this split's logits; -inf when it saw no key.
    lse = jnp.where(l == 0, -jnp.inf, (m + jnp.log2(jnp.where(l == 0, 1.0, l))) / LOG2E)
    plgpu.store(lse_ref.at[b, split, pl.ds(h * group, group_pad)], lse,
                mask=lax.broadcasted_iota(jnp.int32, (group_pad,), 0) < group)


def validate_block_sizes(block_sizes, page_size: int, pages_per_seq: int) -> None:
    check_block_sizes(block_sizes, GpuDecodeBlockSizes)
    if block_sizes.pages_per_block * page_size < MIN_DOT_DIM:
        raise ValueError(
            f"pages_per_block {block_sizes.pages_per_block} x page_size {page_size} = "
            f"{block_sizes.pages_per_block * page_size} tokens per step; the tensor-core dots need "
            f"at least {MIN_DOT_DIM}")
    if block_sizes.pages_per_block * page_size > 4096:
        raise ValueError(
            f"pages_per_block {block_sizes.pages_per_block} x page_size {page_size} = "
            f"{block_sizes.pages_per_block * page_size} tokens per step is over the 4096 limit")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of 2 for the Triton lowering, got {page_size}")
    del pages_per_seq  # any table width works: the last block's slots are masked


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logit_softcap",
                                             "block_sizes", "interpret"))
def paged_attention(q, k_pages, v_pages, block_tables, seq_lens, *, scale, sliding_window=None,
                    logit_softcap=None, block_sizes: GpuDecodeBlockSizes | None = None,
                    interpret: bool = False):
    """Paged decode attention (GPU kernel).

    Args:
      q: [B, N, H] one query per sequence (RoPE applied), any head size H (padded to
        gpu_head_dim(H) lanes inside).
      k_pages, v_pages: [K, num_pages, page_size, H or gpu_head_dim(H)] paged cache, this
        step's k, v written.
      block_tables: [B, P] int32; token p of sequence b is in page block_tables[b, p // page_size]
        at offset p % page_size. Slots past the sequence's last page may hold any value.
      seq_lens: [B] int32 cached tokens per sequence; 0 gives a zero row. Values over
        P * page_size are clamped to it.
      scale: logit scale (static).
      sliding_window: if set, only the last `sliding_window` tokens are visible.
      logit_softcap: if set, logits become softcap * tanh(logits / softcap) after scaling.
      block_sizes: tiling; defaults from tuned_block_sizes for this device.
      interpret: run the kernel in Pallas interpret mode (any backend, e.g. CPU tests).
    Returns:
      [B, N, H] in q.dtype.
    """
    q, k_pages, v_pages, true_head_dim = pad_head_dims(q, k_pages, v_pages, gpu_head_dim(q.shape[-1]))
    num_kv_heads, page_size = check_decode_inputs(q, k_pages, v_pages, block_tables, seq_lens,
                                                  fp8_cache=True)
    check_options(scale, sliding_window, logit_softcap)
    batch, num_heads, head_dim = q.shape
    pages_per_seq = block_tables.shape[1]
    if block_sizes is None:
        block_sizes = gpu_decode_block_sizes(
            head_dim=head_dim, page_size=page_size, dtype=q.dtype, batch=batch,
            num_kv_heads=num_kv_heads, pages_per_seq=pages_per_seq,
            device_kind="interpret" if interpret else None)
    validate_block_sizes(block_sizes, page_size, pages_per_seq)

    group = num_heads // num_kv_heads
    group_pad = max(MIN_DOT_DIM, next_power_of_2(group))
    splits = block_sizes.num_splits
    kernel = functools.partial(
        _decode_kernel, scale=float(scale), sliding_window=sliding_window,
        logit_softcap=None if logit_softcap is None else float(logit_softcap), group=group,
        group_pad=group_pad, page_size=page_size, pages_per_block=block_sizes.pages_per_block,
        num_splits=splits)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)

    k_cache, v_cache, pages_spec = cache_operands(k_pages, v_pages)
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    else:
        out_shape = [jax.ShapeDtypeStruct((batch, splits, num_heads, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((batch, splits, num_heads), jnp.float32)]
    outs = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=[whole(seq_lens), whole(block_tables), whole(q), pages_spec, pages_spec],
        out_specs=[pl.BlockSpec(o.shape, lambda *_, n=len(o.shape): (0,) * n) for o in out_shape],
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(seq_lens, block_tables, q, k_cache, v_cache)
    out = outs[0] if splits == 1 else merge_splits(outs[0], outs[1], q.dtype)
    return out[..., :true_head_dim]
