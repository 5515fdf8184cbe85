"""Prefix caching on hand-worked cases: namespaces (cache_salt), the host KV tier's offloads and
reloads, hashing once per request, counting once per admission, and FCFS with cache hits."""

import pytest

from jaxinfer.engine import block_manager as block_manager_module
from jaxinfer.engine.block_manager import BlockManager, namespace_root
from jaxinfer.engine.host_tier import HostTier
from jaxinfer.engine.request import Request
from jaxinfer.engine.scheduler import Scheduler, SchedulerConfig
from tests.test_block_manager import assert_consistent, hit, lookup, publish
from tests.test_scheduler import FakeModel, FakeRunner, generate_alone


def cached_then_freed(bm, rid, token_ids, cache_salt=None):
    """Computes a request's tokens, publishes its full pages and frees it."""
    bm.allocate_slots(rid, len(token_ids))
    publish(bm, rid, token_ids, len(token_ids), cache_salt)
    bm.free(rid)


# ----- namespaces -----------------------------------------------------------------------------

def test_prompts_differing_only_in_cache_salt_never_share_pages():
    bm = BlockManager(num_pages=10, page_size=2, enable_prefix_caching=True)
    toks = [1, 2, 3, 4, 5]
    cached_then_freed(bm, "a", toks, cache_salt="tenant-a")
    assert hit(bm, toks, "tenant-a") == ([1, 2], 4)
    assert hit(bm, toks, "tenant-b") == ([], 0)
    assert hit(bm, toks) == ([], 0)  # no salt is a namespace of its own
    cached_then_freed(bm, "b", toks)
    assert hit(bm, toks)[1] == 4 and set(hit(bm, toks)[0]).isdisjoint({1, 2})


def test_the_model_namespace_starts_every_chain():
    one = BlockManager(num_pages=4, page_size=2, enable_prefix_caching=True, namespace=b"model-1")
    two = BlockManager(num_pages=4, page_size=2, enable_prefix_caching=True, namespace=b"model-2")
    assert one.hash_blocks([1, 2, 3, 4]) != two.hash_blocks([1, 2, 3, 4])
    assert one.hash_blocks([1, 2, 3, 4]) == BlockManager(4, 2, True, namespace=b"model-1").hash_blocks([1, 2, 3, 4])
    assert namespace_root(b"m", "x") not in (namespace_root(b"m", None), namespace_root(b"mx", None))


@pytest.mark.parametrize("salt", ["", 3, b"x"])
def test_bad_cache_salts_are_refused(salt):
    with pytest.raises(ValueError, match="cache_salt"):
        Request("r", [1], cache_salt=salt)
    with pytest.raises(ValueError, match="cache_salt"):
        namespace_root(b"", salt)


def test_hashes_extend_incrementally():
    bm = BlockManager(num_pages=4, page_size=2, enable_prefix_caching=True)
    hashes = []
    assert bm.extend_block_hashes(hashes, [1, 2, 3]) == 1
    assert bm.extend_block_hashes(hashes, [1, 2, 3]) == 0
    assert bm.extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6]) == 2
    assert hashes == bm.hash_blocks([1, 2, 3, 4, 5, 6])


# ----- the host tier --------------------------------------------------------------------------

def test_evicted_cached_pages_go_to_the_host_tier_and_are_reloaded():
    bm = BlockManager(num_pages=4, page_size=2, enable_prefix_caching=True, num_host_pages=2)  # 3 usable
    a = [1, 2, 3, 4, 5]
    cached_then_freed(bm, "a", a)  # pages 1 ([1,2]) and 2 ([3,4]) cached; LRU order 2, 1
    assert bm.take_transfer_ops() == ([], [])
    bm.allocate_slots("x", 6)  # the uncached page 3, then evicts 2 and 1
    assert bm.take_transfer_ops() == ([(2, 0), (1, 1)], [])
    bm.free("x")  # x's pages were never published: all uncached, freed tail first: 1, 2, 3
    found = lookup(bm, a)
    assert (found.pages, found.host_slots, found.num_tokens, found.num_host_tokens) == ((0, 0), (1, 0), 4, 4)
    assert bm.allocate_slots("b", 5, prefix_hit=found) == [1, 2, 3]
    assert bm.take_transfer_ops() == ([], [(1, 1), (0, 2)])
    # Reloaded pages are published at once: a second request finds them on the device.
    assert hit(bm, a) == ([1, 2], 4)
    bm.record_admission(5, found)
    assert (bm.num_prefix_query_tokens, bm.num_prefix_hit_tokens) == (5, 0)
    assert (bm.num_external_query_tokens, bm.num_external_hit_tokens) == (5, 4)
    assert_consistent(bm)


def test_a_page_offloaded_in_this_step_is_found_only_from_the_next():
    bm = BlockManager(num_pages=3, page_size=2, enable_prefix_caching=True, num_host_pages=4)  # 2 usable
    a = [1, 2, 3]
    cached_then_freed(bm, "a", a)  # page 1 cached, page 2 uncached
    bm.allocate_slots("x", 4)  # evicts page 1 into slot 0
    # The runner lands this step's offloads at the next step's start: a reload planned now
    # would read the slot's old bytes.
    assert lookup(bm, a).num_tokens == 0
    assert bm.take_transfer_ops() == ([(1, 0)], [])
    assert lookup(bm, a).host_slots == (0,)


def test_the_host_tier_evicts_least_recently_used_and_stores_a_hash_once():
    bm = BlockManager(num_pages=3, page_size=2, enable_prefix_caching=True, num_host_pages=1)  # 2 usable
    a, c = [1, 2, 3], [7, 8, 9]
    cached_then_freed(bm, "a", a)  # page 1 cached, page 2 uncached
    assert bm.allocate_slots("x", 4) == [2, 1]
    assert bm.take_transfer_ops() == ([(1, 0)], [])  # a's page goes to the one slot
    bm.free("x")
    cached_then_freed(bm, "c", c)  # page 1 again, now c's
    assert bm.allocate_slots("y", 4) == [2, 1]
    assert bm.take_transfer_ops() == ([(1, 0)], [])  # c's page takes the slot: a's entry is dropped
    bm.free("y")
    assert lookup(bm, a).num_tokens == 0 and lookup(bm, c).host_slots == (0,)
    # c comes back from the host into a fresh page, is evicted again: it is still in the host
    # tier, so no second copy is made.
    assert bm.allocate_slots("c2", 3, prefix_hit=lookup(bm, c)) == [1, 2]
    assert bm.take_transfer_ops() == ([], [(0, 1)])
    bm.free("c2")
    assert bm.allocate_slots("z", 4) == [2, 1]
    assert bm.take_transfer_ops() == ([], [])
    assert lookup(bm, c).host_slots == (0,)


def test_host_tier_needs_prefix_caching_and_valid_sizes():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        BlockManager(num_pages=4, page_size=2, num_host_pages=2)
    with pytest.raises(ValueError, match="num_slots"):
        HostTier(-1)


def test_a_stale_host_hit_is_refused():
    bm = BlockManager(num_pages=3, page_size=2, enable_prefix_caching=True, num_host_pages=1)
    a, c = [1, 2, 3], [7, 8, 9]
    cached_then_freed(bm, "a", a)
    bm.allocate_slots("x", 4)
    bm.free("x")
    bm.take_transfer_ops()
    found = lookup(bm, a)
    cached_then_freed(bm, "c", c)
    bm.allocate_slots("y", 4)  # c's page takes a's slot
    bm.free("y")
    bm.take_transfer_ops()
    with pytest.raises(ValueError, match="no longer in the host tier"):
        bm.allocate_slots("b", 3, prefix_hit=found)


# ----- the scheduler: hashing once, counting once, FCFS ------------------------------------------

def make(num_pages, budget=64, num_host_pages=0, max_num_seqs=4):
    bm = BlockManager(num_pages, 4, enable_prefix_caching=True, num_host_pages=num_host_pages)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 64, 4), bm), bm


def test_a_waiting_request_is_hashed_once_and_counted_once(monkeypatch):
    s, bm = make(num_pages=9)  # 8 usable pages
    runner = FakeRunner(FakeModel(16), 9, 4)
    calls = []
    original = block_manager_module._chain_hash
    monkeypatch.setattr(block_manager_module, "_chain_hash", lambda *a: calls.append(a) or original(*a))
    long = Request("long", list(range(1, 25)), max_tokens=6)  # 24 + 6 tokens: all 8 pages
    # long's first 3 pages, then 2 more full pages and 1 token: 3 new pages after its hit.
    waiting = Request("waiting", list(range(1, 13)) + [15] * 9, max_tokens=1)
    runner.seeds.update(long=1, waiting=2)
    s.add_request(long)
    s.add_request(waiting)
    assert len(calls) == 6 + 5
    for _ in range(5):  # "waiting" cannot get pages while "long" runs: it retries every step
        out = s.schedule()
        assert "waiting" not in out.num_scheduled_tokens
        s.update_from_output(out, runner.execute(out))
    # Each step added one token to "long" (hashed as its pages fill), none to "waiting".
    assert len(calls) == 6 + 5 + len(long.all_token_ids) // 4 - 6
    assert (bm.num_prefix_query_tokens, bm.num_prefix_hit_tokens) == (24, 0)
    while s.has_unfinished_requests():
        out = s.schedule()
        s.update_from_output(out, runner.execute(out))
    # "waiting" was counted once, when admitted, and found long's first 3 pages cached.
    assert (bm.num_prefix_query_tokens, bm.num_prefix_hit_tokens) == (24 + 21, 12)
    for request in (long, waiting):
        assert request.output_token_ids == generate_alone(runner.model, request, runner.seeds[request.request_id],
                                                          64)[0]


def test_a_cache_hit_does_not_overtake_an_earlier_request():
    s, bm = make(num_pages=7)  # 6 usable pages
    runner = FakeRunner(FakeModel(16), 7, 4)
    runner.seeds.update(first=1, hog=2, big=3, hit=4)

    def step():
        out = s.schedule()
        s.update_from_output(out, runner.execute(out))
        return out

    prefix = list(range(1, 9))
    s.add_request(Request("first", prefix + [9], max_tokens=1))
    step()  # first's two full pages stay cached after it finishes
    s.add_request(Request("hog", [5] * 8, max_tokens=4))  # holds 3 pages over steps 2-5
    step(), step()
    assert bm.num_request_pages("hog") == 3 and bm.num_free_pages == 3
    s.add_request(Request("big", [7] * 16, max_tokens=1))  # 4 pages: must wait for hog
    s.add_request(Request("hit", prefix + [10], max_tokens=1))  # 2 cached pages + 1: would fit now
    assert lookup(bm, prefix + [10]).num_tokens == 8
    admitted = []
    while s.has_unfinished_requests():
        out = step()
        admitted += [(r.request_id, r.num_computed_tokens) for r in out.scheduled_new_reqs]
        if admitted:
            assert "hog" not in out.num_scheduled_tokens  # nobody was admitted while hog ran
    # FCFS: the hit waits behind the request that came first, then is admitted in turn.
    assert [rid for rid, _ in admitted] == ["big", "hit"]


def test_dropped_host_slots_are_forgotten_and_free_again():
    tier = HostTier(3)
    slots = [tier.store(d) for d in (b"a", b"b", b"c")]
    tier.end_step()
    tier.drop_slots([slots[1], 99])  # a slot holding nothing is ignored
    assert tier.lookup(b"b") is None and not tier.contains(b"b")
    assert (tier.lookup(b"a"), tier.lookup(b"c")) == (slots[0], slots[2])
    assert tier.num_free_slots == 1 and len(tier) == 2
    assert tier.store(b"d") == slots[1]  # the freed slot, not an eviction
    assert tier.contains(b"a") and tier.contains(b"c")
    # A slot the tier gave to a later page is forgotten under that page's hash.
    tier.end_step()
    tier.drop_slots([slots[1]])
    assert not tier.contains(b"d") and tier.num_free_slots == 1
