"""The attention interface between models and KV-cache backends.

A model computes q, k, v for a flat batch of T tokens and hands them to an attention backend
together with the KV cache of every layer (stacked on a leading layer axis), the index of the
layer, and the step's metadata. The backend writes the new k, v into that layer's slice of the
cache, in place, and returns the attention output. Models never see the cache layout, so the
contiguous reference cache, the paged cache and the Pallas kernels plug in without touching
model code. The layer index may be traced (layers run in `lax.scan`): backends index the
stacked cache with it inside their gathers, scatters and kernels, never by slicing out a copy.

Glossary for shapes: T tokens in the step, B sequences, S tokens per sequence in a step,
M cache positions, N query heads, K kv heads, G = N // K query heads per kv head, H head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Static attention settings of a run of layers (hashable: part of the jitted function's
    identity). Layers that share them run in one scan."""

    scale: float
    sliding_window: int | None = None  # a query at position p sees keys at positions > p - window
    logit_softcap: float | None = None


class AttentionBackend(Protocol):
    """Writes this step's k, v into layer `layer_idx` of `kv_cache` and attends over it.

    The model calls `open_step` before its first layer and `close_step` after its last: a
    backend that never reads this step's keys back from the cache may stage the layers' new
    k, v in a small buffer and write them all at once at the end (see PagedAttentionXLA).

    Args:
      q_tnh: queries [T, N, H] (RoPE applied).
      k_tkh, v_tkh: this step's keys and values [T, K, H].
      kv_cache: the backend's cache of every layer (any pytree of arrays with a leading layer axis).
      metadata: the backend's step metadata (a pytree of arrays; sizes static).
      layer: static settings of the layer.
      layer_idx: the layer's index (int32 scalar, may be traced).
    Returns:
      (o_tnh [T, N, H], updated kv_cache)
    """

    def __call__(self, q_tnh, k_tkh, v_tkh, kv_cache: Any, metadata: Any, layer: LayerSpec, layer_idx): ...

    def open_step(self, kv_cache: Any, num_tokens: int) -> Any: ...

    def close_step(self, kv_cache: Any, metadata: Any) -> Any: ...

    def cache_head_dim(self, head_dim: int) -> int:
        """The head size of the backend's cache for a model's `head_dim` (a kernel that tiles
        only some sizes keeps its pages zero-padded to one)."""


class WritesInPlace:
    """Backends that write each layer's k, v into the cache as the layer runs: the step's
    cache goes in and out of the layers unchanged in form."""

    def open_step(self, kv_cache, num_tokens: int):
        return kv_cache

    def close_step(self, kv_cache, metadata):
        return kv_cache


def grouped_attention(q_bsnh, k_bmkh, v_bmkh, mask_bsm, layer: LayerSpec):
    """Softmax attention with GQA and a boolean mask, softmax in float32.

    q_bsnh [B, S, N, H]; k_bmkh, v_bmkh [B, M, K, H]; mask_bsm [B, S, M] (True = attend).
    Rows with no visible key return zeros.
    """
    b, s, n, h = q_bsnh.shape
    k = k_bmkh.shape[2]
    q_bskgh = q_bsnh.reshape(b, s, k, n // k, h)
    logits = jnp.einsum("bskgh,bmkh->bkgsm", q_bskgh, k_bmkh, preferred_element_type=jnp.float32)
    p = masked_softmax(logits, mask_bsm[:, None, None, :, :], layer)
    o = jnp.einsum("bkgsm,bmkh->bskgh", p.astype(v_bmkh.dtype), v_bmkh,
                   preferred_element_type=jnp.float32)
    return o.reshape(b, s, n, h).astype(q_bsnh.dtype)


def masked_exp(logits, mask, layer: LayerSpec):
    """exp(logits - row max) of scaled (and soft-capped) float32 logits where `mask` holds.

    Returns (row max [..., 1], unnormalised probabilities). Masked entries are 0; a fully
    masked row has max -1e30 and all zeros, never NaN, so blocks of an online softmax combine.
    """
    logits = logits * layer.scale
    if layer.logit_softcap is not None:
        logits = layer.logit_softcap * jnp.tanh(logits / layer.logit_softcap)
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, -1e30)
    return row_max, jnp.where(mask, jnp.exp(logits - row_max), 0.0)


def masked_softmax(logits, mask, layer: LayerSpec):
    """Softmax over the last axis where `mask` holds; fully masked rows are all zeros."""
    _, p = masked_exp(logits, mask, layer)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom == 0, 1.0, denom)


def visible_mask(q_pos, kv_pos, kv_len, sliding_window: int | None):
    """Causal (and windowed) visibility: broadcastable query positions vs cache positions."""
    mask = (kv_pos <= q_pos) & (kv_pos < kv_len)
    if sliding_window is not None:
        mask &= kv_pos > q_pos - sliding_window
    return mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ContiguousMetadata:
    """Step metadata for the contiguous cache: B sequences, S tokens each this step.

    positions_bs [B, S]: position of each token; tokens with position < 0 are padding and are
    neither written nor attended from in a meaningful way (their output is garbage).
    """

    positions_bs: jax.Array


@dataclasses.dataclass(frozen=True)
class ContiguousAttention(WritesInPlace):
    """Reference backend: a dense cache per sequence, k and v of shape [L, B, M, K, H].

    Simple and obviously right; the engine's paged backends are tested against it.
    """

    def init_cache(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype):
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def __call__(self, q_tnh, k_tkh, v_tkh, kv_cache, metadata: ContiguousMetadata, layer: LayerSpec, layer_idx):
        k_cache, v_cache = kv_cache
        positions = metadata.positions_bs
        b, s = positions.shape
        m = k_cache.shape[2]
        # Padding tokens are routed to an out-of-bounds row and dropped by the scatter.
        write_pos = jnp.where(positions >= 0, positions, m)
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
        k_cache = k_cache.at[layer_idx, rows, write_pos].set(k_tkh.reshape(b, s, *k_tkh.shape[1:]), mode="drop")
        v_cache = v_cache.at[layer_idx, rows, write_pos].set(v_tkh.reshape(b, s, *v_tkh.shape[1:]), mode="drop")
        kv_len = jnp.max(positions, axis=1) + 1  # [B]
        mask = visible_mask(positions[:, :, None], jnp.arange(m)[None, None, :], kv_len[:, None, None],
                            layer.sliding_window)
        o = grouped_attention(q_tnh.reshape(b, s, *q_tnh.shape[1:]), k_cache[layer_idx], v_cache[layer_idx],
                              mask, layer)
        return o.reshape(q_tnh.shape), (k_cache, v_cache)
