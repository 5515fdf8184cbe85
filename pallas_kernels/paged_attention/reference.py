"""Pure-jnp reference for paged decode attention: gather every table slot, mask, softmax in float32.

Slow (it materialises each sequence's whole table) and obviously right; the kernels are
tested against it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import check_decode_inputs, check_options, masked_attention_f32


def gather_pages(pages_kmph, block_tables_sp, num_valid_slots_s):
    """Gathers each sequence's pages: [K, M, page_size, H] -> [S, K, P * page_size, H].

    Slots at or past num_valid_slots_s[s] are redirected to page 0 (the scratch page), and ids
    are clamped into range, so a poisoned table slot is never used as an address.
    """
    num_kv_heads, num_pages, page_size, head_dim = pages_kmph.shape
    s, p = block_tables_sp.shape
    slot_ok = jnp.arange(p)[None, :] < num_valid_slots_s[:, None]
    ids = jnp.where(slot_ok, jnp.clip(block_tables_sp, 0, num_pages - 1), 0)
    gathered = pages_kmph[:, ids]  # [K, S, P, page_size, H]
    return jnp.moveaxis(gathered, 0, 1).reshape(s, num_kv_heads, p * page_size, head_dim)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logit_softcap"))
def paged_attention_reference(q, k_pages, v_pages, block_tables, seq_lens, *, scale,
                              sliding_window=None, logit_softcap=None):
    """One decode query per sequence attending to its first seq_lens[b] cached tokens.

    Args:
      q: [B, N, H] queries (RoPE applied).
      k_pages, v_pages: [K, num_pages, page_size, H] paged cache.
      block_tables: [B, P] int32; token p of sequence b lives in page block_tables[b, p // page_size].
      seq_lens: [B] int32 cached tokens per sequence (this step's token included).
      scale: logit scale. sliding_window: keys at positions > seq_len - 1 - window are visible.
      logit_softcap: logits become softcap * tanh(logits / softcap) after scaling.
    Returns:
      [B, N, H] in q.dtype; rows with seq_len 0 are zeros.
    """
    num_kv_heads, page_size = check_decode_inputs(q, k_pages, v_pages, block_tables, seq_lens,
                                                  fp8_cache=True)
    check_options(scale, sliding_window, logit_softcap)
    b, n, h = q.shape
    p = block_tables.shape[1]
    num_slots = jnp.minimum((seq_lens + page_size - 1) // page_size, p)
    k = gather_pages(k_pages, block_tables, num_slots)
    v = gather_pages(v_pages, block_tables, num_slots)
    pos = jnp.arange(p * page_size)[None, :]
    mask = pos < seq_lens[:, None]
    if sliding_window is not None:
        mask &= pos >= seq_lens[:, None] - sliding_window
    q_bkgh = q.reshape(b, num_kv_heads, n // num_kv_heads, h)
    o = masked_attention_f32(q_bkgh, k, v, mask, scale=scale, logit_softcap=logit_softcap)
    return o.reshape(b, n, h).astype(q.dtype)
