"""Paged attention in plain JAX for ragged mixed batches (prefill chunks and decodes together).

The portable backend: correct on every platform, the engine's path on the CPU and the
reference the Pallas kernels are checked against inside the engine. The cache is the stacked
pair `(k_pages, v_pages)`, each [K, L, P, page_size, H] (see engine/kv_cache.py).

A token's visible keys split in two, each computed where it is cheap, and the two partial
softmaxes are merged exactly (log-sum-exp):
  * this step's own tokens of its sequence (a prefill chunk sees itself): a dense, masked
    attention among the step's T tokens, straight from this step's k and v (cast to the cache
    dtype, so the numbers equal a read back from the cache). No gather at all, so a prompt's
    prefill costs what attention over the prompt costs.
  * the sequence's context cached by earlier steps: gathered from the pages per token, in
    blocks of KV_POSITIONS_PER_BLOCK positions, for only as many blocks as the longest context
    in the step needs (a loop with a dynamic trip count): the work follows the real context
    lengths, not max_model_len.

Shapes: T tokens in the step, S sequence slots (padded), W block-table width (pages per
sequence), N query heads, K kv heads, G = N / K, H head dim.
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


def write_kv(k_pages, v_pages, k_tkh, v_tkh, slot_mapping_t, layer_idx):
    """Scatters this step's k/v into layer `layer_idx` of the stacked pools (in place when the
    pools are donated)."""
    kh, L, p, ps, h = k_pages.shape

    def write(pages, x_tkh):
        flat = pages.reshape(kh, L, p * ps, h)
        flat = flat.at[:, layer_idx, slot_mapping_t].set(jnp.swapaxes(x_tkh, 0, 1).astype(pages.dtype))
        return flat.reshape(pages.shape)

    return write(k_pages, k_tkh), write(v_pages, v_tkh)


# Cache positions gathered per token at a time: bounds the step's memory at T x this x K x H
# whatever max_model_len is; the number of blocks follows the longest context in the step.
KV_POSITIONS_PER_BLOCK = 128
# Query rows per block of the in-step attention: bounds its logits at this x N x T.
QUERIES_PER_BLOCK = 512


def _merge(a, b):
    """Exact merge of two partial softmaxes (m [.., 1] running max, l [.., 1] sum, acc [.., H])."""
    m_a, l_a, acc_a = a
    m_b, l_b, acc_b = b
    m = jnp.maximum(m_a, m_b)
    alpha, beta = jnp.exp(m_a - m), jnp.exp(m_b - m)
    return m, alpha * l_a + beta * l_b, alpha * acc_a + beta * acc_b


def _partial(q_tkgh, k_lkh, v_lkh, mask_tl, layer: LayerSpec, keys: str):
    """Unnormalised softmax pieces of queries over one block of keys (float32). `keys` are the
    key arrays' subscripts: "lkh" (keys shared by every query) or "tlkh" (keys per query)."""
    logits = jnp.einsum(f"tkgh,{keys}->tkgl", q_tkgh, k_lkh, preferred_element_type=jnp.float32)
    m, p = masked_exp(logits, mask_tl[:, None, None, :], layer)
    acc = jnp.einsum(f"tkgl,{keys}->tkgh", p.astype(v_lkh.dtype), v_lkh, preferred_element_type=jnp.float32)
    return m, jnp.sum(p, axis=-1, keepdims=True), acc


def real_tokens(md: PagedMetadata, num_tokens: int):
    """[T] bool: the token belongs to a scheduled sequence (not padding)."""
    return jnp.arange(num_tokens) < md.cu_q_lens_s1[md.num_seqs]


def in_step_attention(q_tkgh, k_tkh, v_tkh, md: PagedMetadata, layer: LayerSpec):
    """Each token over this step's tokens of its own sequence (causal, windowed)."""
    t = q_tkgh.shape[0]
    real = real_tokens(md, t)
    bq = min(t, QUERIES_PER_BLOCK)
    nb = -(-t // bq)

    def block(args):
        q, seq, pos = args
        mask = (seq[:, None] == md.token_seq_t[None, :]) & real[None, :]
        mask &= visible_mask(pos[:, None], md.positions_t[None, :], pos[:, None] + 1, layer.sliding_window)
        return _partial(q, k_tkh, v_tkh, mask, layer, "lkh")

    if nb == 1:
        return block((q_tkgh, md.token_seq_t, md.positions_t))
    pad = nb * bq - t  # padded query rows belong to no sequence and see nothing
    rows = (jnp.pad(q_tkgh, ((0, pad), (0, 0), (0, 0), (0, 0))).reshape(nb, bq, *q_tkgh.shape[1:]),
            jnp.pad(md.token_seq_t, (0, pad), constant_values=-1).reshape(nb, bq),
            jnp.pad(md.positions_t, (0, pad)).reshape(nb, bq))
    parts = jax.lax.map(block, rows)
    return jax.tree.map(lambda x: x.reshape(nb * bq, *x.shape[2:])[:t], parts)


def context_attention(q_tkgh, k_pages, v_pages, md: PagedMetadata, layer: LayerSpec, layer_idx, init):
    """Folds each token's attention over its sequence's context cached before this step into
    `init` (a partial softmax), gathering pages per token block by block."""
    kh, _, _, ps, h = k_pages.shape
    t = q_tkgh.shape[0]
    q_lens = md.cu_q_lens_s1[1:] - md.cu_q_lens_s1[:-1]
    ctx_len_t = jnp.where(real_tokens(md, t), (md.kv_lens_s - q_lens)[md.token_seq_t], 0)
    tables_tw = md.block_tables_sw[md.token_seq_t]  # [T, W]
    w = tables_tw.shape[1]
    pages_per_block = max(1, min(w, KV_POSITIONS_PER_BLOCK // ps))
    num_blocks = -(-w // pages_per_block)
    # Pad the table to whole blocks with scratch page 0; those positions are masked anyway.
    tables_tw = jnp.pad(tables_tw, ((0, 0), (0, num_blocks * pages_per_block - w)))
    needed = (jnp.max(ctx_len_t) + pages_per_block * ps - 1) // (pages_per_block * ps)

    def body(carry):
        j, state = carry
        tables_tp = jax.lax.dynamic_slice_in_dim(tables_tw, j * pages_per_block, pages_per_block, axis=1)
        positions = j * pages_per_block * ps + jnp.arange(pages_per_block * ps)
        mask_tl = visible_mask(md.positions_t[:, None], positions[None, :], ctx_len_t[:, None], layer.sliding_window)

        def gather(pages):  # -> [T, pages_per_block * ps, K, H], zero where masked (unused pages may hold NaN)
            x = jnp.moveaxis(pages[:, layer_idx, tables_tp], 0, 3).reshape(t, -1, kh, h)
            return jnp.where(mask_tl[:, :, None, None], x, 0)

        part = _partial(q_tkgh, gather(k_pages), gather(v_pages), mask_tl, layer, "tlkh")
        return j + 1, _merge(state, part)

    _, state = jax.lax.while_loop(lambda c: c[0] < needed, body, (jnp.int32(0), init))
    return state


@dataclasses.dataclass(frozen=True)
class PagedAttentionXLA:
    """Attention backend over the paged cache in plain JAX."""

    name: str = "xla"

    def __call__(self, q_tnh, k_tkh, v_tkh, kv_cache, metadata: PagedMetadata, layer: LayerSpec, layer_idx):
        k_pages, v_pages = write_kv(*kv_cache, k_tkh, v_tkh, metadata.slot_mapping_t, layer_idx)
        t, n, h = q_tnh.shape
        kh = k_tkh.shape[1]
        q = q_tnh.reshape(t, kh, n // kh, h)
        # This step's k/v at the cache's precision: the same numbers a read from the pages gives.
        k_step = k_tkh.astype(k_pages.dtype)
        v_step = v_tkh.astype(v_pages.dtype)
        state = in_step_attention(q, k_step, v_step, metadata, layer)
        m, l, acc = context_attention(q, k_pages, v_pages, metadata, layer, layer_idx, state)
        o = acc / jnp.where(l == 0, 1.0, l)
        return o.reshape(t, n, h).astype(q_tnh.dtype), (k_pages, v_pages)
