"""Pure-jnp reference for ragged paged attention: per query token, gather its sequence's pages,
mask causally, softmax in float32. Memory grows with tokens x cache length: tests only."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import check_options, check_ragged_inputs, masked_attention_f32
from pallas_kernels.paged_attention.reference import gather_pages


def token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens: int):
    """Per query token: (sequence index, position in its sequence, is a real token).

    Token t belongs to sequence s when cu_q_lens[s] <= t < cu_q_lens[s + 1] and s < num_seqs;
    its queries are the last q_len of the sequence's kv_len tokens, so its position is
    kv_len - (cu_q_lens[s + 1] - t). Tokens past cu_q_lens[num_seqs] are padding.
    """
    max_seqs = kv_lens.shape[0]
    n = jnp.minimum(jnp.reshape(num_seqs, ())[()], max_seqs)
    t = jnp.arange(num_tokens)
    ends = jnp.where(jnp.arange(max_seqs) < n, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
    seq = jnp.minimum(jnp.sum(t[:, None] >= ends[None, :], axis=1), max_seqs - 1)
    real = t < cu_q_lens[n]
    pos = kv_lens[seq] - (cu_q_lens[seq + 1] - t)
    return seq, pos, real


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logit_softcap"))
def ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens,
                                     num_seqs, *, scale, sliding_window=None, logit_softcap=None):
    """Mixed prefill chunks and decodes over a paged cache.

    Args:
      q: [T, N, H]; sequence s owns rows cu_q_lens[s]:cu_q_lens[s + 1], the last q_len of its
        kv_lens[s] cached tokens (causal inside the chunk).
      k_pages, v_pages: [K, num_pages, page_size, H].
      kv_lens: [S] int32. block_tables: [S, P] int32. cu_q_lens: [S + 1] int32, cu_q_lens[0] = 0.
      num_seqs: int32 scalar or [1]: sequences in use (dynamic).
      scale, sliding_window, logit_softcap: as in paged_attention_reference.
    Returns:
      [T, N, H] in q.dtype; padding rows are zeros.
    """
    num_kv_heads, page_size, _ = check_ragged_inputs(q, k_pages, v_pages, kv_lens, block_tables,
                                                     cu_q_lens, num_seqs, fp8_cache=True)
    check_options(scale, sliding_window, logit_softcap)
    t, n, h = q.shape
    p = block_tables.shape[1]
    seq, pos, real = token_layout(cu_q_lens, kv_lens, num_seqs, t)
    num_slots = jnp.minimum((kv_lens + page_size - 1) // page_size, p)
    k = gather_pages(k_pages, block_tables, num_slots)[seq]  # [T, K, L, H]
    v = gather_pages(v_pages, block_tables, num_slots)[seq]
    kv_pos = jnp.arange(p * page_size)[None, :]
    mask = real[:, None] & (kv_pos <= pos[:, None]) & (kv_pos < kv_lens[seq][:, None])
    if sliding_window is not None:
        mask &= kv_pos > pos[:, None] - sliding_window
    q_tkgh = q.reshape(t, num_kv_heads, n // num_kv_heads, h)
    o = masked_attention_f32(q_tkgh, k, v, mask, scale=scale, logit_softcap=logit_softcap)
    return o.reshape(t, n, h).astype(q.dtype)
