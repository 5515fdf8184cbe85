"""Paged attention in plain JAX for ragged mixed batches (prefill chunks and decodes together).

The portable backend: correct on every platform, used on the CPU and as the reference the
Pallas kernels are checked against inside the engine. Per layer the cache is a pair
`(k_pages, v_pages)`, each [K, P, page_size, H] (head-major, see docs/design.md).

Shapes: T tokens in the step, S sequence slots (padded), W block-table width (pages per
sequence), L = W * page_size cache positions per sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.models.attention import LayerSpec, masked_softmax, visible_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedMetadata:
    """Step metadata for paged backends. Padding tokens write to page 0, which is never read
    through a valid position; padding sequence slots have kv_len 0 and q_len 0.

    slot_mapping_t [T]: cache slot (page * page_size + offset) each token's k/v is written to.
    token_seq_t [T]: the sequence slot each token belongs to.
    positions_t [T]: each token's position in its sequence.
    block_tables_sw [S, W]: page ids of each sequence.
    kv_lens_s [S]: tokens in each sequence's cache after this step's writes.
    cu_q_lens_s1 [S + 1]: sequence s owns tokens cu_q_lens[s]:cu_q_lens[s + 1].
    num_seqs []: valid sequence slots.
    """

    slot_mapping_t: jax.Array
    token_seq_t: jax.Array
    positions_t: jax.Array
    block_tables_sw: jax.Array
    kv_lens_s: jax.Array
    cu_q_lens_s1: jax.Array
    num_seqs: jax.Array


def write_kv(k_pages, v_pages, k_tkh, v_tkh, slot_mapping_t):
    """Scatters this step's k/v into the page pools (in place when the pools are donated)."""
    kh, p, ps, h = k_pages.shape
    k_flat = k_pages.reshape(kh, p * ps, h).at[:, slot_mapping_t].set(
        jnp.swapaxes(k_tkh, 0, 1).astype(k_pages.dtype))
    v_flat = v_pages.reshape(kh, p * ps, h).at[:, slot_mapping_t].set(
        jnp.swapaxes(v_tkh, 0, 1).astype(v_pages.dtype))
    return k_flat.reshape(k_pages.shape), v_flat.reshape(v_pages.shape)


def gathered_attention(q_tnh, k_pages, v_pages, md: PagedMetadata, layer: LayerSpec):
    """Attention of each token over its own sequence's pages, gathered per token.

    Memory is T * L * K * H: fine for the CPU and small batches, the kernels do better.
    """
    kh, _, ps, h = k_pages.shape
    t, n, _ = q_tnh.shape
    tables_tw = md.block_tables_sw[md.token_seq_t]  # [T, W]
    w = tables_tw.shape[1]

    def gather(pages):  # -> [T, L, K, H]
        g = pages[:, tables_tw]  # [K, T, W, ps, H]
        return jnp.transpose(g, (1, 2, 3, 0, 4)).reshape(t, w * ps, kh, h)

    kv_pos = jnp.arange(w * ps)[None, :]
    kv_len_t = md.kv_lens_s[md.token_seq_t]
    mask_tl = visible_mask(md.positions_t[:, None], kv_pos, kv_len_t[:, None], layer.sliding_window)
    k_tlkh = jnp.where(mask_tl[:, :, None, None], gather(k_pages), 0)
    v_tlkh = jnp.where(mask_tl[:, :, None, None], gather(v_pages), 0)
    g_ = n // kh
    q = q_tnh.reshape(t, kh, g_, h)
    logits = jnp.einsum("tkgh,tlkh->tkgl", q, k_tlkh, preferred_element_type=jnp.float32)
    p = masked_softmax(logits, mask_tl[:, None, None, :], layer)
    o = jnp.einsum("tkgl,tlkh->tkgh", p.astype(v_tlkh.dtype), v_tlkh, preferred_element_type=jnp.float32)
    return o.reshape(t, n, h).astype(q_tnh.dtype)


@dataclasses.dataclass(frozen=True)
class PagedAttentionXLA:
    """Attention backend over the paged cache in plain JAX."""

    name: str = "xla"

    def __call__(self, q_tnh, k_tkh, v_tkh, kv_cache, metadata: PagedMetadata, layer: LayerSpec):
        k_pages, v_pages = write_kv(*kv_cache, k_tkh, v_tkh, metadata.slot_mapping_t)
        return gathered_attention(q_tnh, k_pages, v_pages, metadata, layer), (k_pages, v_pages)
