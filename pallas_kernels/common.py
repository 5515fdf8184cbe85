"""Shared pieces of the paged attention kernels: input validation, the masked softmax of the
references, and the log-sum-exp merge of split-K partial results.

Glossary for shapes: B sequences (decode), T query tokens (ragged), S sequences (ragged),
N query heads, K kv heads, G = N // K query heads per kv head, H head dim, P table slots per
sequence, L = P * page_size cache positions per sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# A float8 KV cache (scale 1, as vLLM's uncalibrated "fp8"), read by the kernels that upcast
# pages to q's dtype after the load (the GPU kernels and the references).
FP8_CACHE_DTYPES = (jnp.dtype(jnp.float8_e4m3fn),)


def check_dtypes(**arrays) -> None:
    """Each named array has one of the kernels' SUPPORTED_DTYPES."""
    for name, x in arrays.items():
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} is not one of {[str(d) for d in SUPPORTED_DTYPES]}")


def check_paged_kv(q, k_pages, v_pages, fp8_cache: bool = False) -> tuple[int, int, int]:
    """Validates q [..., N, H] against k_pages, v_pages [K, num_pages, page_size, H]; the cache
    has q's dtype, or with `fp8_cache` may be float8 e4m3 instead.

    Returns (num_kv_heads, num_pages, page_size).
    """
    if k_pages.ndim != 4:
        raise ValueError(
            f"k_pages must be [num_kv_heads, num_pages, page_size, head_dim], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} must equal k_pages shape {k_pages.shape}")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages dtype {k_pages.dtype} differs from v_pages dtype {v_pages.dtype}")
    check_dtypes(q=q)
    if not (fp8_cache and jnp.dtype(k_pages.dtype) in FP8_CACHE_DTYPES):
        check_dtypes(k_pages=k_pages)
        if q.dtype != k_pages.dtype:
            raise ValueError(f"q dtype {q.dtype} must equal the KV cache dtype {k_pages.dtype}")
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    num_heads, q_head_dim = q.shape[-2:]
    if q_head_dim != head_dim:
        raise ValueError(f"q head_dim {q_head_dim} differs from the KV cache head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"the KV cache needs at least one page of one token, got shape {k_pages.shape}")
    return num_kv_heads, num_pages, page_size


def layer_operand(layer, stacked: bool, what: str):
    """The layer index of a stacked operand as int32 [1] (the kernels read it in place), or None
    for an unstacked one. `layer` may be a Python int or an integer scalar array, traced or not;
    `what` names the operand and its stacked shape in the errors."""
    if not stacked:
        if layer is not None:
            raise ValueError(f"layer is only for a stacked {what}")
        return None
    if layer is None:
        raise ValueError(f"the {what} is stacked: pass the layer index")
    layer = jnp.asarray(layer)
    if not jnp.issubdtype(layer.dtype, jnp.integer) or layer.size != 1 or layer.ndim > 1:
        raise ValueError(f"layer must be one integer (a scalar), got {layer.dtype} of shape {layer.shape}")
    return layer.astype(jnp.int32).reshape(1)


def check_int32(name: str, x, shape: tuple[int, ...]) -> None:
    if x.dtype != jnp.int32:
        raise ValueError(f"{name} must be int32, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def check_decode_inputs(q, k_pages, v_pages, block_tables, seq_lens, fp8_cache: bool = False):
    """Static checks of paged_attention's arrays; returns (num_kv_heads, page_size)."""
    num_kv_heads, _, page_size = check_paged_kv(q, k_pages, v_pages, fp8_cache)
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim], got shape {q.shape}")
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [batch, pages_per_seq], got shape {block_tables.shape}")
    check_int32("block_tables", block_tables, (q.shape[0], block_tables.shape[1]))
    check_int32("seq_lens", seq_lens, (q.shape[0],))
    return num_kv_heads, page_size


def check_ragged_inputs(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                        fp8_cache: bool = False):
    """Static checks of ragged_paged_attention's arrays; returns (num_kv_heads, page_size,
    num_seqs as int32[1])."""
    num_kv_heads, _, page_size = check_paged_kv(q, k_pages, v_pages, fp8_cache)
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {q.shape}")
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [max_seqs, pages_per_seq], got shape {block_tables.shape}")
    max_seqs, pages_per_seq = block_tables.shape
    check_int32("block_tables", block_tables, (max_seqs, pages_per_seq))
    check_int32("kv_lens", kv_lens, (max_seqs,))
    check_int32("cu_q_lens", cu_q_lens, (max_seqs + 1,))
    num_seqs = jnp.asarray(num_seqs)
    if num_seqs.dtype != jnp.int32 or num_seqs.size != 1:
        raise ValueError(f"num_seqs must be one int32, got {num_seqs.dtype} of shape {num_seqs.shape}")
    return num_kv_heads, page_size, num_seqs.reshape(1)


def check_block_sizes(block_sizes, cls) -> None:
    if not isinstance(block_sizes, cls):
        raise ValueError(f"block_sizes must be a {cls.__name__}, got {type(block_sizes).__name__}")


def check_options(scale, sliding_window, logit_softcap) -> None:
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive Python number (static), got {scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
    if logit_softcap is not None and (not isinstance(logit_softcap, (int, float)) or not logit_softcap > 0):
        raise ValueError(f"logit_softcap must be None or a positive number, got {logit_softcap!r}")


def check_positive_ints(obj, *names) -> None:
    """For block-size dataclasses: each named field is a positive int."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def check_powers_of_2(obj, *names) -> None:
    """For block-size dataclasses: each named field is a power of 2 (Triton tensor sizes)."""
    for name in names:
        value = getattr(obj, name)
        if value & (value - 1):
            raise ValueError(f"{type(obj).__name__}.{name} must be a power of 2, got {value}")


def page_blocks(kv_lo, kv_hi, page_size: int, pages_per_block: int):
    """Table slots holding cache positions [kv_lo, kv_hi), in blocks of pages_per_block pages
    starting at kv_lo's page: (first_slot, end_slot, number of blocks); traced scalars."""
    first_slot = kv_lo // page_size
    end_slot = (jnp.maximum(kv_hi, 0) + page_size - 1) // page_size
    num_blocks = jnp.maximum(end_slot - first_slot + pages_per_block - 1, 0) // pages_per_block
    return first_slot, end_slot, num_blocks


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def masked_attention_f32(q_xkgh, k_xkth, v_xkth, mask_xt, *, scale, logit_softcap):
    """Softmax attention in float32 for the references: one query row per x, G heads per kv head.

    q_xkgh [X, K, G, H]; k_xkth, v_xkth [X, K, L, H]; mask_xt [X, L] (True = attend).
    Masked keys and values are zeroed first, so NaN in unused cache slots cannot leak.
    Rows with no visible key return zeros.
    """
    k = jnp.where(mask_xt[:, None, :, None], k_xkth.astype(jnp.float32), 0.0)
    v = jnp.where(mask_xt[:, None, :, None], v_xkth.astype(jnp.float32), 0.0)
    logits = jnp.einsum("xkgh,xkth->xkgt", q_xkgh.astype(jnp.float32), k,
                        precision=jax.lax.Precision.HIGHEST) * scale
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    mask = mask_xt[:, None, None, :]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    return jnp.einsum("xkgt,xkth->xkgh", p, v, precision=jax.lax.Precision.HIGHEST)


def merge_splits(o_parts, lse_parts, out_dtype):
    """Exact merge of split-K partial results.

    o_parts [..., S, N, H] float32: each split's output, normalised by its own softmax sum.
    lse_parts [..., S, N] float32: each split's log-sum-exp of the logits, -inf for a split
    that saw no key. Returns [..., N, H] in out_dtype; rows no split saw come out as zeros.
    """
    lse_max = jnp.max(lse_parts, axis=-2, keepdims=True)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    weights = jnp.exp(lse_parts - lse_max)  # [..., S, N]; 0 for empty splits
    total = jnp.sum(weights, axis=-2)
    o = jnp.sum(o_parts * weights[..., None], axis=-3)
    o = o / jnp.where(total == 0, 1.0, total)[..., None]
    return o.astype(out_dtype)


def next_power_of_2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def pad_head_dims(q, k, v, head_dim_padded: int):
    """Zero-pads the head axis (last) of q, k, v to the size a kernel tiles.

    Zero lanes add nothing to q . k and give zero output lanes, which the caller slices off;
    the logit scale is the caller's (from the model's true head size), so results are exact.
    k and v may already have the padded size (a cache allocated padded, as the engine's Pallas
    backend keeps it, so no step copies its pages); if not, they are padded here, which copies
    them. Returns (q, k, v, true head size)."""
    head_dim = q.shape[-1]
    if head_dim > head_dim_padded:
        raise ValueError(f"head_dim {head_dim} is over the padded size {head_dim_padded}")
    if k.shape[-1] not in (head_dim, head_dim_padded):
        raise ValueError(f"k head_dim {k.shape[-1]} is neither q's ({head_dim}) nor the padded {head_dim_padded}")

    def pad(x):
        if x.shape[-1] == head_dim_padded:
            return x
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, head_dim_padded - x.shape[-1])])

    return pad(q), pad(k), pad(v), head_dim


def load_partials_sum(y_ref, t, cols, splits: int | None):
    """Inside a kernel: row t, columns `cols` of a projection's output, either as stored
    ([T, N] ref, splits None) or summed over its float32 split-K partials ([S, T, N] ref), in
    the order the references sum them."""
    if splits is None:
        return y_ref[t, cols]
    y = y_ref[0, t, cols]
    for s in range(1, splits):
        y = y + y_ref[s, t, cols]
    return y
