"""Variable-length flash attention (prefill) on GPUs: Pallas with the Triton lowering.

Sequences are packed along T. A program owns block_q query rows of one sequence and one query
head (grid axis 0: query tiles, axis 1: the N heads) and runs an online softmax in base 2 over
the keys its rows can see, reading K and V of kv head n // G straight from [T, K, H] (the G
query heads of a kv head re-read it from L2).

Tiles: sequence s owns grid rows from cu_seq_lens[s] // BQ + s on, which leaves room for its
cdiv(len, BQ) tiles whatever the alignment, and a program finds its sequence by a binary
search over cu_seq_lens (as the ragged kernel does). Rows past cu_seq_lens[-1] form a last
pseudo-sequence with no keys, whose programs write zeros; spare programs exit.

Key loop: key blocks that every row of the tile sees in full (below the causal diagonal,
inside the window and the sequence) run without masks or masked loads; only the blocks at the
diagonal, the window's edge and the sequence's end pay for the mask. Query tiles are visited
from the last to the first, so the tiles with the most keys start first (causal work is
triangular; the short tiles fill the tail of the grid).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import check_block_sizes, pad_head_dims
from pallas_kernels.flash_attention.reference import check_flash_inputs
from pallas_kernels.flash_attention.tuned_block_sizes import GpuFlashBlockSizes, gpu_flash_block_sizes
from pallas_kernels.paged_attention.gpu import (M_INIT, MIN_DOT_DIM, _dot, gpu_head_dim, normalise,
                                               online_softmax_step, scaled_logits)
from pallas_kernels.ragged_paged_attention.gpu import find_sequence


def key_blocks(p_first, p_last, seq_len, block_k, *, causal, sliding_window):
    """Key blocks (of block_k positions) seen by query positions [p_first, p_last] of a sequence
    of seq_len tokens: (lo, full_lo, full_hi, hi), where blocks [full_lo, full_hi) are seen in
    full by every query in the range and [lo, full_lo), [full_hi, hi) need the mask."""
    kv_hi = jnp.minimum(p_last + 1, seq_len) if causal else seq_len
    kv_hi = jnp.maximum(kv_hi, 0)
    hi = pl.cdiv(kv_hi, block_k)
    full_hi = (p_first + 1) // block_k if causal else seq_len // block_k
    lo = jnp.int32(0)
    full_lo = jnp.int32(0)
    if sliding_window is not None:
        # The window's first key for p_first, and the first block inside every row's window.
        lo = jnp.maximum(p_first - sliding_window + 1, 0) // block_k
        full_lo = pl.cdiv(jnp.maximum(p_last - sliding_window + 1, 0), block_k)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def _flash_kernel(cu_ref, q_ref, k_ref, v_ref, o_ref, *, block_q, block_k, num_rows, search_steps,
                  scale, causal, sliding_window, logit_softcap):
    row = num_rows - 1 - pl.program_id(0)  # last tiles (most keys under causal) first
    num_tokens, head_dim = q_ref.shape
    num_seqs = cu_ref.shape[0] - 1
    seq, seq_first_row = find_sequence(cu_ref, row, jnp.int32(num_seqs), block_q, search_steps)
    is_pad = seq == num_seqs
    q_begin = cu_ref[seq]
    q_end = jnp.where(is_pad, num_tokens, cu_ref[jnp.minimum(seq + 1, num_seqs)])
    seq_len = jnp.where(is_pad, 0, q_end - q_begin)
    q0 = q_begin + (row - seq_first_row) * block_q

    @pl.when(q0 < q_end)
    def _():
        r = q0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        row_ok = (r < q_end) & (r < num_tokens)
        q = plgpu.load(q_ref.at[pl.ds(q0, block_q)], mask=row_ok[:, None], other=0)
        q_pos = r - q_begin
        p_first = q0 - q_begin
        p_last = jnp.minimum(q0 + block_q, q_end) - 1 - q_begin
        lo, full_lo, full_hi, hi = key_blocks(p_first, p_last, seq_len, block_k, causal=causal,
                                              sliding_window=sliding_window)

        def step(j, carry, masked):
            acc, m, l = carry
            k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
            keys = pl.ds(q_begin + j * block_k, block_k)
            if masked:
                # Rows past the sequence (other sequences' rows, maybe NaN, or past T) load as
                # zeros, since 0 * NaN would poison p @ v; their logits are masked to -inf.
                k_ok = (k_pos < seq_len) & (q_begin + k_pos < num_tokens)
                k = plgpu.load(k_ref.at[keys], mask=k_ok[:, None], other=0)
                v = plgpu.load(v_ref.at[keys], mask=k_ok[:, None], other=0)
                visible = k_ok[None, :] & row_ok[:, None]
                if causal:
                    visible &= k_pos[None, :] <= q_pos[:, None]
                if sliding_window is not None:
                    visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
            else:
                k, v = k_ref[keys], v_ref[keys]
            s = scaled_logits(_dot(q, k, ((1,), (1,))), scale=scale, logit_softcap=logit_softcap)
            if masked:
                s = jnp.where(visible, s, -jnp.inf)
            return online_softmax_step(acc, m, l, s, v)

        carry = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), M_INIT, jnp.float32),
                 jnp.zeros((block_q,), jnp.float32))
        carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
        acc, _, l = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)
        plgpu.store(o_ref.at[pl.ds(q0, block_q)], normalise(acc, l).astype(o_ref.dtype),
                    mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("scale", "causal", "sliding_window", "logit_softcap",
                                             "block_sizes", "interpret"))
def flash_attention(q, k, v, cu_seq_lens, *, scale, causal=True, sliding_window=None, logit_softcap=None,
                    block_sizes: GpuFlashBlockSizes | None = None, interpret: bool = False):
    """Variable-length flash attention (GPU kernel).

    Args:
      q: [T, N, H]; k, v: [T, K, H], N a multiple of K; any head size H (zero-padded to
        gpu_head_dim(H) lanes inside) (query head n reads kv head n // (N // K)).
      cu_seq_lens: [S + 1] int32, non-decreasing, cu_seq_lens[0] = 0: sequence s owns rows
        cu_seq_lens[s]:cu_seq_lens[s + 1]; rows past cu_seq_lens[-1] are padding.
      scale: logit scale (static). causal: mask keys after the query, per sequence.
      sliding_window: a query at position p sees keys at positions > p - sliding_window.
      logit_softcap: logits become cap * tanh(logits / cap).
      block_sizes: tiling; defaults from tuned_block_sizes for this device.
      interpret: run the kernel in Pallas interpret mode.
    Returns:
      [T, N, H] in q.dtype; padding rows are zeros.
    """
    q, k, v, true_head_dim = pad_head_dims(q, k, v, gpu_head_dim(q.shape[-1]))
    num_kv_heads = check_flash_inputs(q, k, v, cu_seq_lens, scale=scale, sliding_window=sliding_window,
                                      logit_softcap=logit_softcap)
    num_tokens, num_heads, head_dim = q.shape
    if block_sizes is None:
        block_sizes = gpu_flash_block_sizes(head_dim=head_dim, dtype=q.dtype,
                                            device_kind="interpret" if interpret else None)
    check_block_sizes(block_sizes, GpuFlashBlockSizes)
    for name in ("block_q", "block_k"):
        if getattr(block_sizes, name) < MIN_DOT_DIM:
            raise ValueError(f"{name} {getattr(block_sizes, name)}: the tensor cores need at least {MIN_DOT_DIM}")
    num_seqs = cu_seq_lens.shape[0] - 1
    group = num_heads // num_kv_heads
    num_rows = pl.cdiv(num_tokens, block_sizes.block_q) + num_seqs
    kernel = functools.partial(
        _flash_kernel, block_q=block_sizes.block_q, block_k=block_sizes.block_k, num_rows=num_rows,
        search_steps=max(1, num_seqs.bit_length()), scale=float(scale), causal=bool(causal),
        sliding_window=sliding_window, logit_softcap=None if logit_softcap is None else float(logit_softcap))
    # Query tiles are the fastest grid axis, so the programs resident at once share the K, V of
    # one or two heads in L2. Measured at P3 on the H100 it made no difference against heads
    # fastest (296 vs 302 TFLOP/s, within run-to-run noise; benchmarks/results/flash_attention_*):
    # the kernel is not bound by K, V traffic.
    head_spec = pl.BlockSpec((num_tokens, None, head_dim), lambda i, n: (0, n, 0))
    kv_spec = pl.BlockSpec((num_tokens, None, head_dim), lambda i, n: (0, n // group, 0))
    out = pl.pallas_call(
        kernel,
        grid=(num_rows, num_heads),
        in_specs=[pl.BlockSpec(cu_seq_lens.shape, lambda i, n: (0,)), head_spec, kv_spec, kv_spec],
        out_specs=head_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="flash_attention",
    )(cu_seq_lens, q, k, v)
    return out[..., :true_head_dim]
