"""Pure-jnp reference for variable-length flash attention: the full [T, T] logits per head,
masked to each sequence (causal, windowed if asked), softmax in float32. Memory grows with
T^2 x heads: tests and correctness checks only."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import check_dtypes, check_int32, check_options


def check_flash_inputs(q, k, v, cu_seq_lens, *, scale, sliding_window, logit_softcap) -> int:
    """Static checks of flash_attention's arguments (shared by the kernels); returns K."""
    if q.ndim != 3 or k.ndim != 3:
        raise ValueError(f"q must be [T, N, H] and k [T, K, H], got shapes {q.shape} and {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {v.shape} must equal k shape {k.shape}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {k.shape} must have the tokens and head_dim of q {q.shape}")
    check_dtypes(q=q, k=k, v=v)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    num_tokens, num_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens < 1:
        raise ValueError("q needs at least one token row")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if cu_seq_lens.ndim != 1 or cu_seq_lens.shape[0] < 2:
        raise ValueError(f"cu_seq_lens must be [num_seqs + 1] with num_seqs >= 1, got shape {cu_seq_lens.shape}")
    check_int32("cu_seq_lens", cu_seq_lens, cu_seq_lens.shape)
    check_options(scale, sliding_window, logit_softcap)
    return num_kv_heads


def token_positions(cu_seq_lens, num_tokens: int):
    """Per token: (sequence index, position in its sequence, is a real token). Token t belongs
    to sequence s when cu_seq_lens[s] <= t < cu_seq_lens[s + 1]; tokens at or past
    cu_seq_lens[-1] are padding."""
    t = jnp.arange(num_tokens)
    seq = jnp.sum(t[:, None] >= cu_seq_lens[None, 1:], axis=1)
    real = t < cu_seq_lens[-1]
    pos = t - cu_seq_lens[jnp.minimum(seq, cu_seq_lens.shape[0] - 1)]
    return seq, pos, real


def visible_keys(cu_seq_lens, num_tokens: int, *, causal, sliding_window):
    """[T, T] mask: query row i may attend to key row j."""
    seq, pos, real = token_positions(cu_seq_lens, num_tokens)
    mask = real[:, None] & real[None, :] & (seq[:, None] == seq[None, :])
    if causal:
        mask &= pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        mask &= pos[None, :] > pos[:, None] - sliding_window
    return mask


@functools.partial(jax.jit, static_argnames=("scale", "causal", "sliding_window", "logit_softcap"))
def flash_attention_reference(q, k, v, cu_seq_lens, *, scale, causal=True, sliding_window=None,
                              logit_softcap=None):
    """Attention over sequences packed along T.

    Args:
      q: [T, N, H]; k, v: [T, K, H] with N a multiple of K (query head n reads kv head n // G).
      cu_seq_lens: [S + 1] int32, non-decreasing, cu_seq_lens[0] = 0; sequence s owns rows
        cu_seq_lens[s]:cu_seq_lens[s + 1].
      scale: logit scale. causal: mask keys after the query. sliding_window: a query at
        position p sees keys at positions > p - sliding_window. logit_softcap: logits become
        cap * tanh(logits / cap).
    Returns:
      [T, N, H] in q.dtype; rows past cu_seq_lens[-1] are zeros.
    """
    num_kv_heads = check_flash_inputs(q, k, v, cu_seq_lens, scale=scale, sliding_window=sliding_window,
                                      logit_softcap=logit_softcap)
    t, n, h = q.shape
    out_dtype = q.dtype
    mask = visible_keys(cu_seq_lens, t, causal=causal, sliding_window=sliding_window)
    # Masked keys and values are zeroed first, so NaN in padding rows cannot leak.
    key_used = jnp.any(mask, axis=0)[:, None, None]
    k = jnp.where(key_used, k.astype(jnp.float32), 0.0)
    v = jnp.where(key_used, v.astype(jnp.float32), 0.0)
    q = jnp.where(jnp.any(mask, axis=1)[:, None, None], q.astype(jnp.float32), 0.0)
    q_tkgh = q.reshape(t, num_kv_heads, n // num_kv_heads, h)
    logits = jnp.einsum("tkgh,skh->kgts", q_tkgh, k, precision=jax.lax.Precision.HIGHEST) * scale
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o = jnp.einsum("kgts,skh->tkgh", p, v, precision=jax.lax.Precision.HIGHEST)
    return o.reshape(t, n, h).astype(out_dtype)
