"""Prefix caching and the host KV tier through the real engine (tiny model, CPU): outputs equal
the engine with caching off under random arrivals, n > 1 and preemption; the host pool's copies
move exactly the bytes of the pages they name; nothing compiles after warm-up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.engine.compile_counter import CompileCounter
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.engine.kv_cache import KVCacheSpec
from jaxinfer.engine.kv_offload import TRANSFER_BATCHES, HostKVPool, exact_spans
from jaxinfer.sampling_params import SamplingParams
from tests.engine_fixtures import tiny_model

PAGE = 4


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _engine(model, *, num_host_pages=0, **kw):
    cfg = dict(max_model_len=64, max_num_seqs=6, max_num_batched_tokens=32, page_size=PAGE, num_pages=96,
               compilation_cache_dir="", warmup=True)
    cfg.update(kw)
    if num_host_pages:
        page_bytes = KVCacheSpec.bytes_per_page(model.config, PAGE, jnp.float32)
        cfg["kv_offloading_size"] = num_host_pages * page_bytes / 2**30
    return LLMEngine(model, EngineConfig(**cfg), kv_fill=float("nan"))


def _workload(vocab: int, seed: int = 0):
    """Requests sharing a few system prompts, arriving at random steps, some with n = 2."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(3, vocab, int(rng.integers(9, 22))).tolist() for _ in range(3)]
    work = []
    for i in range(22):
        prompt = systems[int(rng.integers(0, 3))] + rng.integers(3, vocab, int(rng.integers(1, 8))).tolist()
        n = 2 if i % 5 == 0 else 1
        params = SamplingParams(n=n, temperature=0.8 if n > 1 else 0.0, seed=i, max_tokens=int(rng.integers(2, 14)),
                                ignore_eos=True)
        work.append((int(rng.integers(0, 30)), str(i), prompt, params))
    return sorted(work, key=lambda w: w[0])


def _run(engine, work):
    pending, step, done = list(work), 0, {}
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [c.token_ids for c in out.outputs]
        step += 1
    return done


def test_outputs_equal_with_caching_off_on_and_through_the_host_tier(model):
    work = _workload(model.config.vocab_size)
    reference = _run(_engine(model, enable_prefix_caching=False), work)
    cached = _engine(model)
    assert _run(cached, work) == reference
    assert cached.block_manager.num_prefix_hit_tokens > 0
    # 19 usable device pages: cached prefixes are evicted, offloaded and reloaded, and running
    # requests are preempted.
    tiered = _engine(model, num_pages=20, num_host_pages=24)
    with CompileCounter() as counter:
        assert _run(tiered, work) == reference
    assert counter.count == 0, "a host-tier copy compiled after warm-up"
    m = tiered.metrics.snapshot()
    assert tiered.runner.host_kv.num_offloaded > 0 and tiered.runner.host_kv.num_reloaded > 0
    assert m.external_prefix_cache_hits_total == tiered.runner.host_kv.num_reloaded * PAGE
    assert m.external_prefix_cache_queries_total == m.prefix_cache_queries_total > 0
    assert tiered.scheduler.num_preemptions_total > 0


@pytest.mark.parametrize("num_host_pages", [6, 1])
def test_a_host_tier_smaller_than_a_step_serves_no_stale_page(model, num_host_pages):
    """So small a tier that one step's offloads take the slots of pages the same step reloads,
    and old copies pile up until whole batches are let go: outputs still equal caching off."""
    work = _workload(model.config.vocab_size)
    reference = _run(_engine(model, enable_prefix_caching=False, warmup=False), work)
    tiered = _engine(model, num_pages=20, num_host_pages=num_host_pages, warmup=False)
    assert _run(tiered, work) == reference
    pool = tiered.runner.host_kv
    assert pool.num_reloaded > 0 and pool.num_rows_held <= num_host_pages
    if num_host_pages == 6:
        assert pool.num_dropped > 0


def test_cache_salt_keeps_prompts_apart(model):
    engine = _engine(model)
    prompt = {"prompt_token_ids": list(range(3, 23))}
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = {}
    for rid, salt in (("a", "tenant-a"), ("b", "tenant-b"), ("a2", "tenant-a")):
        hits = engine.block_manager.num_prefix_hit_tokens
        engine.add_request(rid, {**prompt, "cache_salt": salt}, params)
        while engine.has_unfinished_requests():
            outs.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        outs[rid + " hits"] = engine.block_manager.num_prefix_hit_tokens - hits
    assert (outs["a hits"], outs["b hits"], outs["a2 hits"]) == (0, 0, 16)
    assert outs["a"] == outs["b"] == outs["a2"]
    with pytest.raises(ValueError, match="cache_salt"):
        engine.add_request("c", prompt, params, cache_salt="")
    with pytest.raises(ValueError, match="twice"):
        engine.add_request("c", {**prompt, "cache_salt": "x"}, params, cache_salt="y")


def test_kv_offloading_size_is_validated(model):
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching=False, kv_offloading_size=1.0)
    with pytest.raises(ValueError, match="positive number"):
        EngineConfig(kv_offloading_size=0)
    with pytest.raises(ValueError, match="holds no page"):
        LLMEngine(model, EngineConfig(max_model_len=64, num_pages=32, page_size=PAGE, kv_offloading_size=1e-9,
                                      compilation_cache_dir="", warmup=False))


# ----- the host pool's copies against NumPy ---------------------------------------------------

def test_exact_spans_cover_every_page_without_padding():
    for num in range(0, 200):
        spans = exact_spans(num)
        covered = [page for start, b in spans for page in range(start, start + b)]
        assert covered == list(range(num)) and {b for _, b in spans} <= set(TRANSFER_BATCHES)
    assert exact_spans(75) == [(0, 64), (64, 8), (72, 1), (73, 1), (74, 1)]


def _pools(spec, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal(spec.pool_shape).astype(np.float32)
    v = rng.standard_normal(spec.pool_shape).astype(np.float32)
    device = jax.devices()[0]
    return k, v, (jax.device_put(k, device), jax.device_put(v, device)), device


def test_host_pool_copies_move_exactly_the_named_pages():
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=4, page_size=2, num_pages=12, dtype="float32")
    k, v, kv, device = _pools(spec)
    pool = HostKVPool(spec, num_slots=12, placement=device)
    kv = pool.warmup(kv)
    k[:, :, 0] = v[:, :, 0] = 0  # the warm-up writes zeros into the scratch page only
    offloads = [(p, s) for s, p in enumerate(range(1, 11))]  # 10 pages: batches of 8, 1 and 1
    kv = pool.apply(kv, offloads, [])
    pool.land()
    for page, slot in offloads:
        np.testing.assert_array_equal(pool.read(slot)[0], k[:, :, page])
        np.testing.assert_array_equal(pool.read(slot)[1], v[:, :, page])
    # Page 11 is offloaded and, in the same step, overwritten by a reload of slot 0 (page 1's):
    # the offload reads the page first.
    kv = pool.apply(kv, [(11, 11)], [(0, 11), (3, 2)])
    np.testing.assert_array_equal(pool.read(11)[0], k[:, :, 11])
    want_k, want_v = k.copy(), v.copy()
    want_k[:, :, 11], want_v[:, :, 11] = k[:, :, 1], v[:, :, 1]
    want_k[:, :, 2], want_v[:, :, 2] = k[:, :, 4], v[:, :, 4]
    # Rows of the reloaded batch that were not asked for land in the scratch page (page 0).
    np.testing.assert_array_equal(np.asarray(kv[0])[:, :, 1:], want_k[:, :, 1:])
    np.testing.assert_array_equal(np.asarray(kv[1])[:, :, 1:], want_v[:, :, 1:])
    assert (pool.num_offloaded, pool.num_reloaded) == (11, 2)
    # A slot given to another page in the step that reloads it reloads its old page.
    kv = pool.apply(kv, [(5, 0)], [(0, 6)])
    np.testing.assert_array_equal(np.asarray(kv[0])[:, :, 6], k[:, :, 1])
    np.testing.assert_array_equal(pool.read(0)[0], k[:, :, 5])


def test_host_pool_lets_the_emptiest_batch_go_when_old_rows_pile_up():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, page_size=2, num_pages=40, dtype="float32")
    k, v, kv, device = _pools(spec, seed=1)
    pool = HostKVPool(spec, num_slots=16, placement=device)
    kv = pool.warmup(kv)
    # Two batches of 8 fill the pool's 16 rows.
    kv = pool.apply(kv, [(1 + i, i) for i in range(16)], [])
    assert (pool.num_rows_held, pool.take_dropped()) == (16, [])
    # Slots 0-6 are written again: the first batch keeps one live row (slot 7) and 23 rows would
    # be held, so that batch goes.
    kv = pool.apply(kv, [(20 + i, i) for i in range(7)], [])
    assert pool.num_rows_held == 15
    dropped = pool.take_dropped()
    assert dropped == [7] and pool.num_dropped == 1  # the emptiest batch went, with its one live row
    assert pool.num_rows_held <= pool.num_slots
    for slot in range(7):
        np.testing.assert_array_equal(pool.read(slot)[0], k[:, :, 20 + slot])
    for slot in range(8, 16):
        np.testing.assert_array_equal(pool.read(slot)[1], v[:, :, 1 + slot])
    with pytest.raises(ValueError, match="holds no page"):
        pool.read(7)
    with pytest.raises(ValueError, match="holds no page"):
        pool.apply(kv, [], [(7, 3)])


def test_a_preempted_request_resumes_from_its_cached_pages_not_by_recompute(model):
    """Preemption frees a request's pages into the prefix cache (full pages keep their hashes),
    and with a host tier evicted ones go to host memory: on readmission the request finds them
    there, which is vLLM v1's answer to swapping. Prompts share nothing, so every hit here is a
    resumed request's own pages."""
    rng = np.random.default_rng(7)
    work = [(0, str(i), rng.integers(3, model.config.vocab_size, 14).tolist(),
             SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)) for i in range(6)]

    def run(**kw):
        engine = _engine(model, num_pages=20, warmup=False, **kw)
        computed, schedule = [0], engine.scheduler.schedule

        def counting_schedule():  # tokens the model computes, step by step
            out = schedule()
            computed[0] += out.total_num_scheduled_tokens
            return out
        engine.scheduler.schedule = counting_schedule
        for _, rid, prompt, params in work:
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        return engine, done, computed[0]

    off, reference, computed_off = run(enable_prefix_caching=False)
    tiered, outputs, computed_tiered = run(num_host_pages=24)
    assert outputs == reference
    assert off.scheduler.num_preemptions_total > 0 and tiered.scheduler.num_preemptions_total > 0
    bm = tiered.block_manager
    resumed_from_cache = bm.num_prefix_hit_tokens + bm.num_external_hit_tokens
    assert resumed_from_cache > 0
    # Without the cache, every preemption recomputes; with it, the resumed pages are not computed again.
    assert computed_tiered < computed_off, (computed_tiered, computed_off)
