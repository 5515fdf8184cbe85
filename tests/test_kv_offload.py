"""The host KV pool's copies (engine/kv_offload.py): a reload moves only the host batches that hold
the rows it asks for, the copies are queued so that a reload waits for nothing of its own step,
and nothing compiles after warm-up. Counts are checked against hand-derived numbers and, through
the engine, against a model of the layout; contents against NumPy."""

import jax
import numpy as np
import pytest

from jaxinfer.engine.compile_counter import CompileCounter
from jaxinfer.engine.kv_cache import KVCacheSpec
from jaxinfer.engine.kv_offload import HOST_BATCH, TRANSFER_BATCHES, HostKVPool
from tests.engine_fixtures import tiny_model
from tests.test_prefix_cache_engine import _engine, _run, _workload

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, page_size=2, num_pages=100, dtype="float32")


def _pool(num_slots=90, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal(SPEC.pool_shape).astype(np.float32)
    v = rng.standard_normal(SPEC.pool_shape).astype(np.float32)
    device = jax.devices()[0]
    pool = HostKVPool(SPEC, num_slots=num_slots, placement=device)
    kv = pool.warmup((jax.device_put(k, device), jax.device_put(v, device)))
    k[:, :, 0] = v[:, :, 0] = 0  # the warm-up writes zeros into the scratch page only
    return pool, kv, k, v


def _assert_pages(kv, k, v, pages_from):
    """Pools equal the reference pools with page p holding source page pages_from[p] (scratch
    page 0 not compared)."""
    want_k, want_v = k.copy(), v.copy()
    for page, src in pages_from.items():
        want_k[:, :, page], want_v[:, :, page] = k[:, :, src], v[:, :, src]
    np.testing.assert_array_equal(np.asarray(kv[0])[:, :, 1:], want_k[:, :, 1:])
    np.testing.assert_array_equal(np.asarray(kv[1])[:, :, 1:], want_v[:, :, 1:])


def test_transfer_sizes_split_into_whole_host_batches():
    for b in TRANSFER_BATCHES:
        assert b <= HOST_BATCH or b % HOST_BATCH == 0, b


def test_a_reload_moves_only_the_host_batches_holding_its_rows():
    pool, kv, k, v = _pool()
    # 75 pages in one step: gathers of 64, 8, 1, 1 and 1 pages; pages 1..75 go to slots 0..74.
    kv = pool.apply(kv, [(1 + slot, slot) for slot in range(75)], [])
    assert (pool.num_rows_to_host, pool.num_rows_to_device) == (75, 0)
    # Slots 0, 3 and 7 share the first host batch of 8 rows, slot 9 is in the second, slot 66 in
    # the 8-page gather's batch and slot 73 is a one-page gather: 8 + 8 + 8 + 1 rows move
    # (reloading whole gathers would move 64 + 8 + 1).
    reloads = [(0, 80), (3, 81), (7, 82), (9, 83), (66, 84), (73, 85)]
    kv = pool.apply(kv, [], reloads)
    assert pool.num_rows_to_device == 25 and pool.num_reloaded == 6
    _assert_pages(kv, k, v, {80: 1, 81: 4, 82: 8, 83: 10, 84: 67, 85: 74})


def test_reloads_of_many_batches_take_the_warm_scatters_and_compile_nothing():
    pool, kv, k, v = _pool()
    kv = pool.apply(kv, [(1 + slot, slot) for slot in range(75)], [])
    with CompileCounter() as counter:
        # Every batch of the 64-page gather (8 batches of 8) and a one-page batch; then two batches
        # of 8 and a one-page batch in a step that also offloads.
        kv = pool.apply(kv, [], [(8 * i, 80 + i) for i in range(8)] + [(72, 88)])
        kv = pool.apply(kv, [(95, 80)], [(1, 90), (17, 91), (74, 92)])
        pool.land()
    assert counter.count == 0, "a host-tier copy compiled after warm-up"
    assert pool.num_rows_to_device == 8 * 8 + 1 + 2 * 8 + 1
    # The second step's offload read page 95 before its reloads wrote the pools.
    _assert_pages(kv, k, v, {**{80 + i: 1 + 8 * i for i in range(8)}, 88: 73, 90: 2, 91: 18, 92: 75})
    np.testing.assert_array_equal(pool.read(80)[0], k[:, :, 95])


def test_rows_written_from_elsewhere_are_reloaded_batch_by_batch():
    pool, kv, k, v = _pool()
    rows = np.stack([np.stack([k[:, :, p], v[:, :, p]]) for p in range(20, 31)])  # 11 pages: 8, 1, 1, 1
    pool.write_rows(list(range(11)), rows)
    kv = pool.apply(kv, [], [(9, 50)])
    assert pool.num_rows_to_device == 1
    kv = pool.apply(kv, [], [(2, 51), (5, 52)])
    assert pool.num_rows_to_device == 1 + 8
    _assert_pages(kv, k, v, {50: 29, 51: 22, 52: 25})


def test_a_reload_is_queued_before_the_steps_offloads_and_their_host_copies_after_its_scatters():
    """The order that keeps a reload's DMA from queueing behind this step's offloads, and the
    offloads' DMA from holding the device's queue: reload copies, gathers (whose output stays on
    the device), scatters, then the copies to the host."""
    pool, kv, k, v = _pool()
    kv = pool.apply(kv, [(1 + slot, slot) for slot in range(16)], [])
    events = []

    def spy(name, fn):
        def call(*args):
            out = fn(*args)
            kinds = {x.sharding.memory_kind for x in jax.tree.leaves(out)}
            events.append((name, tuple(sorted(kinds))))
            return out
        return call

    for name in ("_to_device", "_gather", "_scatter", "_to_host"):
        setattr(pool, name, spy(name, getattr(pool, name)))
    # Page 5 is offloaded and, in the same step, overwritten by the reload of slot 2 (page 3).
    kv = pool.apply(kv, [(5, 20), (6, 21)], [(2, 5)])
    assert events == [("_to_device", ("device",)), ("_gather", ("device",)), ("_gather", ("device",)),
                      ("_scatter", ("device",)), ("_to_host", ("pinned_host",))]
    np.testing.assert_array_equal(pool.read(20)[0], k[:, :, 5])
    _assert_pages(kv, k, v, {5: 3})


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _expected_rows_moved(steps):
    """Rows a reload moves under the layout: each step's offloads split into transfers of 64, 8
    and 1 pages (largest first), each transfer into host batches of at most 8 rows; a reload moves
    every batch holding a slot's copy as it was before its step's offloads."""
    batch_of, rows_moved, next_id = {}, 0, 0
    for offloads, reloads in steps:
        rows_moved += sum(size for _, size in {batch_of[slot] for slot, _ in reloads})
        slots, start = [slot for _, slot in offloads], 0
        for b in (64, 8, 1):
            while len(slots) - start >= b:
                for i in range(start, start + b, 8):
                    size = min(b, 8)
                    for slot in slots[i:i + size]:
                        batch_of[slot] = (next_id, size)
                    next_id += 1
                start += b
    return rows_moved


def test_engine_reloads_move_the_batches_the_layout_predicts_and_outputs_match(model):
    work = _workload(model.config.vocab_size)
    reference = _run(_engine(model, enable_prefix_caching=False, warmup=False), work)
    tiered = _engine(model, num_pages=20, num_host_pages=40, warmup=False)
    pool, steps, apply = tiered.runner.host_kv, [], tiered.runner.host_kv.apply

    def recording_apply(kv_cache, offloads, reloads):
        steps.append((list(offloads), list(reloads)))
        return apply(kv_cache, offloads, reloads)
    pool.apply = recording_apply
    assert _run(tiered, work) == reference
    assert pool.num_reloaded > 0 and pool.num_dropped == 0
    assert pool.num_rows_to_device == _expected_rows_moved(steps)


def _mesh_main():
    """In a subprocess with several CPU devices: the pool over pools whose kv heads are split."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    kv_sharding = NamedSharding(mesh, PartitionSpec("tp"))
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal(SPEC.pool_shape).astype(np.float32) for _ in range(2))
    pool = HostKVPool(SPEC, 90, NamedSharding(mesh, PartitionSpec()), kv_sharding)
    kv = pool.warmup((jax.device_put(k, kv_sharding), jax.device_put(v, kv_sharding)))
    k[:, :, 0] = v[:, :, 0] = 0
    kv = pool.apply(kv, [(1 + slot, slot) for slot in range(75)], [])
    with CompileCounter() as counter:
        kv = pool.apply(kv, [(90, 80)], [(0, 80), (73, 81)] + [(8 * i + 1, 83 + i) for i in range(8)])
    assert counter.count == 0 and pool.num_rows_to_device == 8 * 8 + 1
    assert kv[0].sharding == kv_sharding
    _assert_pages(kv, k, v, {80: 1, 81: 74, **{83 + i: 8 * i + 2 for i in range(8)}})
    np.testing.assert_array_equal(pool.read(80)[0], k[:, :, 90])
    print("mesh ok", flush=True)


def test_the_pool_on_a_mesh_moves_the_same_rows():
    from tests.test_data_parallel import run_in_subprocess

    assert "mesh ok" in run_in_subprocess("from tests.test_kv_offload import _mesh_main; _mesh_main()")
