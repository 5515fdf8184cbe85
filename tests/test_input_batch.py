"""The persistent batch's step inputs against the chunk-by-chunk builder, and packed transfers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.engine.input_batch import PersistentBatch
from jaxinfer.engine.packing import pack, unpack
from jaxinfer.engine.sampling import SamplingMetadata, SamplingRow
from tests.step_inputs_reference import SeqChunk, build_step_inputs
from jaxinfer.sampling_params import SamplingParams

PAGE, WIDTH = 4, 10


def _random_step(rng, batch: PersistentBatch, tables: dict):
    """Requests with random block tables, chunk lengths and starts, laid out as a step."""
    ids = [f"r{i}" for i in rng.permutation(len(tables))[:int(rng.integers(1, len(tables) + 1))]]
    chunks, starts, lens, tokens = [], [], [], []
    for rid in ids:
        table = tables[rid]
        capacity = len(table) * PAGE
        n = int(rng.integers(1, min(7, capacity + 1)))
        start = int(rng.integers(0, capacity - n + 1))
        toks = rng.integers(0, 100, n).tolist()
        chunks.append(SeqChunk(toks, start, table))
        starts.append(start)
        lens.append(n)
        tokens += toks
    return ids, chunks, starts, lens, tokens


def test_step_inputs_match_the_chunk_builder():
    rng = np.random.default_rng(0)
    batch = PersistentBatch(8, WIDTH, PAGE)
    tables = {}
    for i in range(6):
        pages = rng.permutation(np.arange(1, 60))[:int(rng.integers(1, WIDTH + 1))].tolist()
        split = int(rng.integers(0, len(pages) + 1))
        batch.add(f"r{i}", pages[:split])  # the table arrives in two parts, as steps extend it
        batch.append_pages(f"r{i}", pages[split:])
        tables[f"r{i}"] = pages
    batch.remove("r3")
    batch.add("r3", tables["r3"])  # rows are reused
    tables["r0"] = tables["r0"][:1]
    batch.set_pages("r0", tables["r0"])  # a shorter table leaves no stale pages behind
    for _ in range(30):
        ids, chunks, starts, lens, tokens = _random_step(rng, batch, tables)
        t = 1 << int(np.ceil(np.log2(max(sum(lens), 1)))) if sum(lens) > 1 else 1
        s = len(ids) + int(rng.integers(0, 3))
        logits = None if rng.random() < 0.5 else rng.integers(0, sum(lens), len(ids)).tolist()
        want = build_step_inputs(chunks, t, s, WIDTH, PAGE, logits)
        got = batch.step_inputs(t, s, ids, starts, lens, tokens, logits)
        assert (got.num_tokens, got.num_seqs) == (want.num_tokens, want.num_seqs)
        fields = lambda x: [x.token_ids_t, x.positions_t, x.logits_indices_s, *jax.tree.leaves(x.metadata)]
        for a, b in zip(fields(got), fields(want), strict=True):
            np.testing.assert_array_equal(a, b)


def test_step_inputs_reject_what_does_not_fit():
    batch = PersistentBatch(2, WIDTH, PAGE)
    batch.add("a", [1, 2])
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        batch.step_inputs(16, 2, ["a"], [7], [2], [5, 6])
    with pytest.raises(ValueError, match="exceeds padded sizes"):
        batch.step_inputs(1, 2, ["a"], [0], [2], [5, 6])
    with pytest.raises(ValueError, match="exceeds width"):
        batch.append_pages("a", list(range(3, 3 + WIDTH)))
    batch.add("b", [3])
    with pytest.raises(RuntimeError, match="all 2 rows"):
        batch.add("c", [4])


def test_pack_round_trips_through_jit():
    rows = [SamplingRow(SamplingParams(temperature=0.7, top_p=0.9, seed=2**40 + 3), [1], [2, 3]), None,
            SamplingRow(SamplingParams(temperature=0.0, logit_bias={3: -1.5}), [1], [])]
    md = SamplingMetadata.build(rows, batch_size=4, vocab_size=16, penalty_slots=[0, 0, 0])
    packed, spec = pack(md)
    assert packed.dtype == np.int32 and packed.ndim == 1
    back = jax.jit(unpack, static_argnums=1)(jnp.asarray(packed), spec)
    assert back.variant == md.variant == "full"
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(md)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(TypeError, match="cannot pack"):
        pack((np.zeros(2, np.float64),))
