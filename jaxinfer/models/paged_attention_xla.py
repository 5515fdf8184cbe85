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

from jaxinfer.models.attention import LayerSpec, masked_exp, visible_mask


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


# Cache positions gathered per token at a time: bounds the step's memory at T x this x K x H
# whatever max_model_len is, while short contexts still take a single block.
KV_POSITIONS_PER_BLOCK = 512


def gathered_attention(q_tnh, k_pages, v_pages, md: PagedMetadata, layer: LayerSpec):
    """Attention of each token over its own sequence's pages, gathered per token.

    The block table is walked in blocks of pages with an online softmax (flash-attention
    style), so memory stays T x KV_POSITIONS_PER_BLOCK x K x H. Each token still reads its
    sequence's whole cache: fine for the CPU and small batches; the kernels do better.
    """
    kh, _, ps, h = k_pages.shape
    t, n, _ = q_tnh.shape
    g = n // kh
    tables_tw = md.block_tables_sw[md.token_seq_t]  # [T, W]
    w = tables_tw.shape[1]
    pages_per_block = max(1, min(w, KV_POSITIONS_PER_BLOCK // ps))
    num_blocks = -(-w // pages_per_block)
    # Pad the table to whole blocks with scratch page 0; those positions are masked anyway.
    tables_tw = jnp.pad(tables_tw, ((0, 0), (0, num_blocks * pages_per_block - w)))
    tables_btp = jnp.moveaxis(tables_tw.reshape(t, num_blocks, pages_per_block), 1, 0)
    kv_len_t = md.kv_lens_s[md.token_seq_t]
    q = q_tnh.reshape(t, kh, g, h)

    def block(carry, inputs):
        m_prev, l_prev, acc = carry  # [T, K, G, 1] x2, [T, K, G, H] (float32)
        j, tables_tp = inputs
        positions = j * pages_per_block * ps + jnp.arange(pages_per_block * ps)
        mask_tl = visible_mask(md.positions_t[:, None], positions[None, :], kv_len_t[:, None],
                               layer.sliding_window)
        kv_mask = mask_tl[:, :, None, None]

        def gather(pages):  # -> [T, L, K, H], zero where masked (unused pages may hold NaN)
            x = jnp.transpose(pages[:, tables_tp], (1, 2, 3, 0, 4)).reshape(t, -1, kh, h)
            return jnp.where(kv_mask, x, 0)

        k_tlkh, v_tlkh = gather(k_pages), gather(v_pages)
        logits = jnp.einsum("tkgh,tlkh->tkgl", q, k_tlkh, preferred_element_type=jnp.float32)
        m_blk, p = masked_exp(logits, mask_tl[:, None, None, :], layer)
        m_new = jnp.maximum(m_prev, m_blk)
        alpha, beta = jnp.exp(m_prev - m_new), jnp.exp(m_blk - m_new)
        l_new = alpha * l_prev + beta * jnp.sum(p, axis=-1, keepdims=True)
        pv = jnp.einsum("tkgl,tlkh->tkgh", p.astype(v_tlkh.dtype), v_tlkh, preferred_element_type=jnp.float32)
        return (m_new, l_new, alpha * acc + beta * pv), None

    init = (jnp.full((t, kh, g, 1), -1e30, jnp.float32), jnp.zeros((t, kh, g, 1), jnp.float32),
            jnp.zeros((t, kh, g, h), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(block, init, (jnp.arange(num_blocks), tables_btp))
    o = acc / jnp.where(l == 0, 1.0, l)
    return o.reshape(t, n, h).astype(q_tnh.dtype)


@dataclasses.dataclass(frozen=True)
class PagedAttentionXLA:
    """Attention backend over the paged cache in plain JAX."""

    name: str = "xla"

    def __call__(self, q_tnh, k_tkh, v_tkh, kv_cache, metadata: PagedMetadata, layer: LayerSpec):
        k_pages, v_pages = write_kv(*kv_cache, k_tkh, v_tkh, metadata.slot_mapping_t)
        return gathered_attention(q_tnh, k_pages, v_pages, metadata, layer), (k_pages, v_pages)
