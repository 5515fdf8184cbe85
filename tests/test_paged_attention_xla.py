"""The paged XLA backend inside the model against the contiguous reference: chunked prefills and
decodes mixed in one step, permuted pages, and a NaN-poisoned pool."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from jaxinfer.config import preset
from jaxinfer.engine.kv_cache import KVCacheSpec, allocate_kv_cache
from tests.step_inputs_reference import SeqChunk, build_step_inputs
from jaxinfer.generate import prefill_logits
from jaxinfer.models import create_model
from jaxinfer.models.paged_attention_xla import PagedAttentionXLA
from tests.engine_fixtures import peaked

PAGE = 4


@pytest.fixture(scope="module")
def model():
    config = preset("tiny", sliding_windows=(None, 6))
    model = create_model(config)
    nnx.update(model, peaked(nnx.state(model)))
    return config, model


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, token_ids, positions, caches, md, logits_indices):
    model = nnx.merge(graphdef, state)
    hidden, pending = model(token_ids, positions, caches, md, PagedAttentionXLA())
    # The backend stages the step's writes: the pools are written after the step.
    return model.compute_logits(hidden[logits_indices]), PagedAttentionXLA.commit(caches, pending, md.slot_mapping_t)


@pytest.mark.parametrize("gather_budget,queries_per_block", [(32 * 24, 512), (32 * 4, 8), (32 * 4, 12)])
def test_chunked_mixed_steps_match_reference(model, monkeypatch, gather_budget, queries_per_block):
    """The step has 32 tokens and tables of 6 pages of 4. 32 x 24: the whole table and the
    step's tokens in one block each; 32 x 4: an online softmax over many one-page cache blocks
    and the in-step attention in 4 query blocks; 12: query blocks that do not divide the step
    (its last block is padded)."""
    import jaxinfer.models.paged_attention_xla as xla

    monkeypatch.setattr(xla, "KV_GATHER_BUDGET", gather_budget)
    monkeypatch.setattr(xla, "QUERIES_PER_BLOCK", queries_per_block)
    _run.clear_cache()  # the block sizes are read at trace time
    config, params = model
    graphdef, state = nnx.split(params)
    rng = np.random.default_rng(0)
    lengths = [1, PAGE - 1, PAGE, PAGE + 1, 17]
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in lengths]
    spec = KVCacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, PAGE, num_pages=40,
                       dtype="float32")
    caches = allocate_kv_cache(spec, fill=float("nan"))
    free = rng.permutation(np.arange(1, 40)).tolist()
    tables = [[free.pop() for _ in range(-(-n // PAGE))] for n in lengths]
    computed = [0] * len(prompts)
    got = [[] for _ in prompts]
    # Feed prompts in uneven chunks so most steps mix prefill chunks with near-decode chunks.
    while any(c < len(p) for c, p in zip(computed, prompts)):
        chunks, owners = [], []
        for i, p in enumerate(prompts):
            if computed[i] < len(p):
                n = min(len(p) - computed[i], int(rng.integers(1, 6)))
                chunks.append(SeqChunk(p[computed[i]:computed[i] + n], computed[i], tables[i]))
                owners.append(i)
        inputs = build_step_inputs(chunks, num_tokens_padded=32, num_seqs_padded=8, pages_per_seq=6,
                                   page_size=PAGE)
        rows = np.concatenate([[0], inputs.metadata.cu_q_lens_s1[1:len(chunks) + 1]])
        # Logits for every valid token so each step is checked, not just the last.
        idx = np.arange(32, dtype=np.int32)
        logits, caches = _run(graphdef, state, inputs.token_ids_t, inputs.positions_t, caches,
                              jax.tree.map(jnp.asarray, inputs.metadata), idx)
        logits = np.asarray(logits)
        for j, i in enumerate(owners):
            got[i].append(logits[rows[j]:rows[j + 1]])
            computed[i] += len(chunks[j].token_ids)
    for p, parts in zip(prompts, got):
        ours = np.concatenate(parts)
        ref = prefill_logits(params, p)
        assert np.isfinite(ours).all()
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
