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
    blocks of KV_GATHER_BUDGET / T positions, for only as many blocks as the longest context
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


def to_cache_dtype(x, dtype):
    """x in the cache's dtype; into float8, saturated at its largest finite value first (e4m3fn
    has no infinity: an overflow would become NaN)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 1:
        top = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -top, top)
    return x.astype(dtype)


def write_kv(k_pages, v_pages, k_tkh, v_tkh, slot_mapping_t, layer_idx):
    """Scatters this step's k/v into layer `layer_idx` of the stacked pools (in place when the
    pools are donated)."""
    kh, L, p, ps, h = k_pages.shape

    def write(pages, x_tkh):
        flat = pages.reshape(kh, L, p * ps, h)
        flat = flat.at[:, layer_idx, slot_mapping_t].set(to_cache_dtype(jnp.swapaxes(x_tkh, 0, 1), pages.dtype),
                                                     mode="promise_in_bounds")
        return flat.reshape(pages.shape)

    return write(k_pages, k_tkh), write(v_pages, v_tkh)


# Cache positions gathered per block for all T tokens together: a block of a step of T tokens
# holds KV_GATHER_BUDGET / T positions (at least a page), so memory stays bounded at
# KV_GATHER_BUDGET x K x H whatever max_model_len is, while a decode of few tokens walks its
# context in few blocks (each block costs a loop iteration: about 70 us on the CPU).
KV_GATHER_BUDGET = 1024
# Query rows per block of the in-step attention: bounds its logits at this x N x T.
QUERIES_PER_BLOCK = 512


def _merge(a, b):
    """Exact merge of two partial softmaxes (m [.., 1] running max, l [.., 1] sum, acc [.., H])."""
    m_a, l_a, acc_a = a
    m_b, l_b, acc_b = b
    m = jnp.maximum(m_a, m_b)
    alpha, beta = jnp.exp(m_a - m), jnp.exp(m_b - m)
    return m, alpha * l_a + beta * l_b, alpha * acc_a + beta * acc_b


def _partial(q_ktgh, k_keys, v_keys, mask_tl, layer: LayerSpec, keys: str):
    """Unnormalised softmax pieces of queries over one block of keys (float32), kv head major
    throughout so XLA's batched dots need no transposes. `keys` are the key arrays' subscripts:
    "klh" (keys shared by every query) or "ktlh" (keys per query)."""
    # A float8 cache is widened to the queries' dtype; otherwise the two are one dtype already.
    k_keys, v_keys = k_keys.astype(q_ktgh.dtype), v_keys.astype(q_ktgh.dtype)
    logits = jnp.einsum(f"ktgh,{keys}->ktgl", q_ktgh, k_keys, preferred_element_type=jnp.float32)
    m, p = masked_exp(logits, mask_tl[None, :, None, :], layer)
    acc = jnp.einsum(f"ktgl,{keys}->ktgh", p.astype(v_keys.dtype), v_keys, preferred_element_type=jnp.float32)
    return m, jnp.sum(p, axis=-1, keepdims=True), acc


def real_tokens(md: PagedMetadata, num_tokens: int):
    """[T] bool: the token belongs to a scheduled sequence (not padding)."""
    return jnp.arange(num_tokens) < md.cu_q_lens_s1[md.num_seqs]


def in_step_attention(q_ktgh, k_kth, v_kth, md: PagedMetadata, layer: LayerSpec):
    """Each token over this step's tokens of its own sequence (causal, windowed)."""
    t = q_ktgh.shape[1]
    real = real_tokens(md, t)
    bq = min(t, QUERIES_PER_BLOCK)
    nb = -(-t // bq)

    def block(args):
        q, seq, pos = args
        mask = (seq[:, None] == md.token_seq_t[None, :]) & real[None, :]
        mask &= visible_mask(pos[:, None], md.positions_t[None, :], pos[:, None] + 1, layer.sliding_window)
        return _partial(q, k_kth, v_kth, mask, layer, "klh")

    if nb == 1:
        return block((q_ktgh, md.token_seq_t, md.positions_t))
    pad = nb * bq - t  # padded query rows belong to no sequence and see nothing
    q_blocks = jnp.pad(q_ktgh, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(q_ktgh.shape[0], nb, bq,
                                                                           *q_ktgh.shape[2:])
    rows = (jnp.moveaxis(q_blocks, 1, 0),
            jnp.pad(md.token_seq_t, (0, pad), constant_values=-1).reshape(nb, bq),
            jnp.pad(md.positions_t, (0, pad)).reshape(nb, bq))
    parts = jax.lax.map(block, rows)  # each [nb, K, bq, G, .]
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], nb * bq, *x.shape[3:])[:, :t],
                        parts)


def context_attention(q_ktgh, k_pages, v_pages, md: PagedMetadata, layer: LayerSpec, layer_idx, init):
    """Folds each token's attention over its sequence's context cached before this step into
    `init` (a partial softmax), gathering whole pages per token block by block."""
    kh, _, _, ps, h = k_pages.shape
    t = q_ktgh.shape[1]
    q_lens = md.cu_q_lens_s1[1:] - md.cu_q_lens_s1[:-1]
    ctx_len_t = jnp.where(real_tokens(md, t), (md.kv_lens_s - q_lens)[md.token_seq_t], 0)
    tables_tw = md.block_tables_sw[md.token_seq_t]  # [T, W]
    w = tables_tw.shape[1]
    pages_per_block = max(1, min(w, KV_GATHER_BUDGET // (t * ps)))
    num_blocks = -(-w // pages_per_block)
    # Pad the table to whole blocks with scratch page 0; those positions are masked anyway.
    tables_tw = jnp.pad(tables_tw, ((0, 0), (0, num_blocks * pages_per_block - w)))
    needed = (jnp.max(ctx_len_t) + pages_per_block * ps - 1) // (pages_per_block * ps)

    def body(carry):
        j, state = carry
        tables_tp = jax.lax.dynamic_slice_in_dim(tables_tw, j * pages_per_block, pages_per_block, axis=1)
        positions = j * pages_per_block * ps + jnp.arange(pages_per_block * ps)
        mask_tl = visible_mask(md.positions_t[:, None], positions[None, :], ctx_len_t[:, None], layer.sliding_window)

        def gather(pages):  # [K, T, pages_per_block * ps, H]: each token's pages, kv head major
            return pages[:, layer_idx, tables_tp].reshape(kh, t, -1, h)

        # Masked logits never count, but 0 * NaN would: unused pages may hold anything, so the
        # values outside the mask are zeroed.
        v = jnp.where(mask_tl[None, :, :, None], gather(v_pages), 0)
        part = _partial(q_ktgh, gather(k_pages), v, mask_tl, layer, "ktlh")
        return j + 1, _merge(state, part)

    _, state = jax.lax.while_loop(lambda c: c[0] < needed, body, (jnp.int32(0), init))
    return state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StagedKV:
    """The pools plus this step's new k, v of every layer, [L, T, K, H] each, written into the
    pools once, after the last layer."""

    k_pages: jax.Array
    v_pages: jax.Array
    k_new: jax.Array
    v_new: jax.Array


@dataclasses.dataclass(frozen=True)
class PagedAttentionXLA:
    """Attention backend over the paged cache in plain JAX.

    Nothing a step computes reads its own keys back from the pools (the in-step part uses
    them directly), so each layer's new k, v are staged in a small buffer that the model
    returns instead of the pools, and the caller writes them with `commit` in a second,
    donated call: the model step only reads the pools. (Written inside the step, XLA's CPU
    backend copies the donated pools around the context loops: 1.6 s a step instead of 27 ms
    for the demo model with unrolled layers.)
    """

    name: str = "xla"
    stages_writes = True  # the model returns pending writes; see `commit`

    def cache_head_dim(self, head_dim: int) -> int:
        return head_dim  # any head size as it is

    def open_step(self, kv_cache, num_tokens: int) -> StagedKV:
        k_pages, v_pages = kv_cache
        kh, num_layers, _, _, h = k_pages.shape
        new = jnp.zeros((num_layers, num_tokens, kh, h), k_pages.dtype)
        return StagedKV(k_pages, v_pages, new, new)

    def close_step(self, staged: StagedKV, metadata: PagedMetadata):
        """The step's pending writes: (k_new, v_new), [L, T, K, H] each."""
        return staged.k_new, staged.v_new

    @staticmethod
    def commit(kv_cache, pending, slot_mapping_t):
        """Writes a step's pending k, v of every layer into the pools (in place when donated)."""
        def write(pages, new_ltkh):
            kh, num_layers, p, ps, h = pages.shape
            flat = pages.reshape(kh, num_layers, p * ps, h)
            flat = flat.at[:, :, slot_mapping_t].set(jnp.transpose(new_ltkh, (2, 0, 1, 3)).astype(pages.dtype),
                                                     mode="promise_in_bounds")
            return flat.reshape(pages.shape)

        return tuple(write(pages, new) for pages, new in zip(kv_cache, pending))

    def __call__(self, q_tnh, k_tkh, v_tkh, staged: StagedKV, metadata: PagedMetadata, layer: LayerSpec, layer_idx):
        t, n, h = q_tnh.shape
        kh = k_tkh.shape[1]
        q = jnp.swapaxes(q_tnh.reshape(t, kh, n // kh, h), 0, 1)  # [K, T, G, H]
        # This step's k/v at the cache's precision: the same numbers a read from the pages gives.
        k_step = to_cache_dtype(k_tkh, staged.k_pages.dtype)
        v_step = to_cache_dtype(v_tkh, staged.v_pages.dtype)
        state = in_step_attention(q, jnp.swapaxes(k_step, 0, 1), jnp.swapaxes(v_step, 0, 1), metadata, layer)
        m, l, acc = context_attention(q, staged.k_pages, staged.v_pages, metadata, layer, layer_idx, state)
        staged = StagedKV(staged.k_pages, staged.v_pages,
                          jax.lax.dynamic_update_index_in_dim(staged.k_new, k_step, layer_idx, 0),
                          jax.lax.dynamic_update_index_in_dim(staged.v_new, v_step, layer_idx, 0))
        o = acc / jnp.where(l == 0, 1.0, l)  # [K, T, G, H]
        return jnp.swapaxes(o, 0, 1).reshape(t, n, h).astype(q_tnh.dtype), staged
