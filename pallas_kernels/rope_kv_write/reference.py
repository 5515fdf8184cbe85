"""Pure-jnp reference for finishing a fused q|k|v projection: rotary embedding of q and k, and
the write of k and v into one layer of the stacked paged pools. Also the checks it shares with
the kernel, and the rotary embedding the models use (one definition of the rounding order).

Glossary for shapes: T tokens, S split-K partials, K kv heads, G query heads per kv head,
H head size, L stacked layers, P pages per layer, ps tokens per page. The projection's columns
are grouped per kv head: [K, G + 2, H] (G query heads, then the key, then the value).

What it computes, in the order and precision of the unfused model code:
  y       = sum of the partials in float32, cast to `dtype` (or the [T, N] product as given)
  q, k    = with q_norm / k_norm, each head RMS-normed over H first (rms_norm's order for the
            norm kind, see pallas_kernels/rms_norm); then the rotate-half RoPE of y's query and
            key heads, in float32, cast to `dtype`
  pools   = k and v written at slot_mapping[t] of layer `layer` (row layer * P * ps + slot)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import check_dtypes, check_int32, layer_operand
from pallas_kernels.rms_norm.reference import NORM_KINDS, rms_norm_ordered


def rotate_half_rope(x, cos, sin):
    """Rotary embedding in the HF rotate-half layout: x [..., H] with cos and sin broadcasting
    to [..., H/2], computed in float32 and cast back to x's dtype."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def check_head_norms(q_norm, k_norm, head_size: int, num_layers: int, norm_kind: str) -> None:
    """q_norm and k_norm: both None, or both [H] or stacked [L, H] (the pools' layers)."""
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together")
    if q_norm is None:
        return
    if norm_kind not in NORM_KINDS:
        raise ValueError(f"norm_kind must be one of {NORM_KINDS}, got {norm_kind!r}")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w.shape not in ((head_size,), (num_layers, head_size)):
            raise ValueError(f"{name} must be [{head_size}] or [{num_layers}, {head_size}], got {w.shape}")
        check_dtypes(**{name: w})


def head_norm_weight(w, layer):
    """The layer's row of a stacked [L, H] head-norm weight (clamped), or the [H] weight."""
    if w.ndim == 1:
        return w
    return w[jnp.clip(layer, 0, w.shape[0] - 1)]


def check_rope_kv_inputs(qkv, cos, sin, k_pages, v_pages, slot_mapping, layer, num_kv_heads: int, dtype):
    """Static checks; returns (T, G, H, the output dtype, layer as int32 [1])."""
    if qkv.ndim not in (2, 3):
        raise ValueError(f"qkv must be [T, N] or float32 partials [S, T, N], got shape {qkv.shape}")
    if qkv.ndim == 3 and qkv.dtype != jnp.float32:
        raise ValueError(f"split-K partials must be float32, got {qkv.dtype}")
    out_dtype = jnp.dtype(dtype if dtype is not None else qkv.dtype)
    check_dtypes(qkv=qkv, k_pages=k_pages)
    if k_pages.ndim != 5 or v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"k_pages and v_pages must be equal stacked pools [K, L, P, page_size, H], got "
                         f"{k_pages.shape} {k_pages.dtype} and {v_pages.shape} {v_pages.dtype}")
    if k_pages.dtype != out_dtype:
        raise ValueError(f"the pools' dtype {k_pages.dtype} must be the projection's output dtype {out_dtype}")
    t, n = qkv.shape[-2:]
    kh, _, _, _, h = k_pages.shape
    if kh != num_kv_heads or n % (kh * h) or n // (kh * h) < 3:
        raise ValueError(f"qkv width {n} is not {num_kv_heads} kv heads x (G + 2) heads of {h}")
    if h % 2:
        raise ValueError(f"head size {h} must be even for the rotary embedding")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (t, h // 2) or table.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32 [{t}, {h // 2}], got {table.dtype} {table.shape}")
    check_int32("slot_mapping", slot_mapping, (t,))
    layer = layer_operand(layer, True, f"pools {k_pages.shape}")
    return t, n // (kh * h) - 2, h, out_dtype, layer


@functools.partial(jax.jit, static_argnames=("num_kv_heads", "dtype", "norm_eps", "norm_kind"))
def rope_kv_write_reference(qkv, cos, sin, k_pages, v_pages, slot_mapping, layer, *, num_kv_heads: int,
                            dtype=None, q_norm=None, k_norm=None, norm_eps: float = 1e-6,
                            norm_kind: str = "llama"):
    """(q [T, K * G, H], k_pages, v_pages) from a fused q|k|v projection (see the module doc).

    Args:
      qkv: [T, N] in `dtype`, or float32 split-K partials [S, T, N].
      cos, sin: float32 [T, H/2], the rotary tables of the tokens' positions.
      k_pages, v_pages: stacked pools [K, L, P, page_size, H] in `dtype`.
      slot_mapping: int32 [T], each token's slot in its layer's pages (page * page_size + offset).
      layer: the layer written (int32 scalar, may be traced; clamped into range).
      num_kv_heads: K.
      dtype: the projection's output dtype (default qkv's; required for partials).
      q_norm, k_norm: per-head RMSNorm weights of the query and key heads (Qwen3, Gemma 3),
        [H] or stacked [L, H] read at `layer`; None: no head norm.
      norm_eps, norm_kind: the head norm's epsilon and order ("llama" or "gemma").
    """
    t, g, h, dtype, layer = check_rope_kv_inputs(qkv, cos, sin, k_pages, v_pages, slot_mapping, layer,
                                                 num_kv_heads, dtype)
    check_head_norms(q_norm, k_norm, h, k_pages.shape[1], norm_kind)
    y = (jnp.sum(qkv, axis=0) if qkv.ndim == 3 else qkv).astype(dtype).reshape(t, num_kv_heads, g + 2, h)
    q, k, v = y[:, :, :g], y[:, :, g], y[:, :, g + 1]
    if q_norm is not None:
        q = rms_norm_ordered(q, head_norm_weight(q_norm, layer[0]), norm_eps, norm_kind)
        k = rms_norm_ordered(k, head_norm_weight(k_norm, layer[0]), norm_eps, norm_kind)
    q = rotate_half_rope(q, cos[:, None, None, :], sin[:, None, None, :]).reshape(t, num_kv_heads * g, h)
    k = rotate_half_rope(k, cos[:, None, :], sin[:, None, :])
    kh, num_layers, p, ps, _ = k_pages.shape
    layer = jnp.clip(layer[0], 0, num_layers - 1)

    def write(pages, x_tkh):
        flat = pages.reshape(kh, num_layers, p * ps, h)
        return flat.at[:, layer, slot_mapping].set(jnp.swapaxes(x_tkh, 0, 1)).reshape(pages.shape)

    return q, write(k_pages, k), write(v_pages, v)
