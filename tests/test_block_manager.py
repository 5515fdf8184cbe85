"""BlockManager on small hand-worked cases: allocation, watermark, fork and copy-on-write, prefix cache."""

import subprocess
import sys

import pytest

from jaxinfer.engine.block_manager import BlockManager, PrefixHit


def assert_consistent(bm: BlockManager):
    """Ref counts equal table membership; free pages are exactly the unreferenced ones."""
    held = {}
    for rid in bm.request_ids():
        for page in bm.block_table(rid):
            held[page] = held.get(page, 0) + 1
    assert 0 not in held
    for page in range(1, bm.num_pages):
        assert bm.ref_count(page) == held.get(page, 0), page
    free = bm.free_page_ids()
    assert len(free) == len(set(free)) == bm.num_free_pages
    assert set(free) == set(range(1, bm.num_pages)) - set(held)
    assert bm.usage == pytest.approx(len(held) / (bm.num_pages - 1))


def test_modules_do_not_import_jax():
    code = ("import sys; import jaxinfer.engine.block_manager, jaxinfer.engine.request, "
            "jaxinfer.engine.scheduler; assert 'jax' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocation_grows_tables_and_counts_exactly():
    bm = BlockManager(num_pages=6, page_size=4)
    assert bm.num_free_pages == 5 and bm.usage == 0.0
    assert bm.allocate_slots("a", 5) == [1, 2]
    assert bm.allocate_slots("a", 8) == []  # still two pages
    assert bm.allocate_slots("a", 9) == [3]
    assert bm.block_table("a") == [1, 2, 3]
    assert bm.num_free_pages == 2 and bm.usage == pytest.approx(0.6)
    assert_consistent(bm)
    # Three more pages do not exist: refused, nothing changes.
    assert bm.allocate_slots("b", 9) is None
    assert not bm.has_request("b") and bm.num_free_pages == 2
    assert bm.allocate_slots("a", 21) is None
    assert bm.block_table("a") == [1, 2, 3]
    assert bm.allocate_slots("b", 8) == [4, 5]
    assert bm.num_free_pages == 0
    assert_consistent(bm)
    bm.free("a")
    assert bm.num_free_pages == 3 and not bm.has_request("a")
    bm.free("a")  # unknown ids are ignored
    assert bm.num_free_pages == 3
    assert_consistent(bm)


def test_page_zero_is_never_handed_out():
    bm = BlockManager(num_pages=9, page_size=2)
    pages = bm.allocate_slots("a", 16)
    assert sorted(pages) == list(range(1, 9))
    assert bm.allocate_slots("b", 1) is None


def test_watermark_applies_to_new_requests_only():
    bm = BlockManager(num_pages=7, page_size=4, watermark_pages=2)  # 6 allocatable
    assert bm.allocate_slots("a", 20) is None  # 5 pages would leave 1 < 2 free
    assert bm.allocate_slots("a", 16) == [1, 2, 3, 4]  # leaves exactly the watermark
    assert bm.num_admissible_pages == 0
    assert bm.allocate_slots("b", 1) is None
    assert bm.allocate_slots("a", 24) == [5, 6]  # a running request may use the reserve
    assert bm.num_free_pages == 0
    assert_consistent(bm)


def test_fork_shares_pages_and_copy_on_write_gives_private_copies():
    bm = BlockManager(num_pages=8, page_size=4)
    bm.allocate_slots("a", 6)  # pages 1, 2; page 2 half full
    bm.fork("a", "b")
    assert bm.block_table("b") == [1, 2]
    assert bm.ref_count(1) == bm.ref_count(2) == 2
    assert bm.num_free_pages == 5
    assert_consistent(bm)

    # b writes position 5 (page index 1): page 2 is shared, so b gets a copy of it.
    ops = bm.prepare_write("b", 5, 6)
    assert ops == [(2, 3)]
    assert bm.block_table("b") == [1, 3]
    assert bm.ref_count(2) == 1 and bm.ref_count(3) == 1 and bm.ref_count(1) == 2
    assert bm.prepare_write("b", 5, 8) == []  # already private
    assert bm.prepare_write("a", 4, 8) == []  # a holds page 2 alone now
    assert_consistent(bm)

    # A write spanning both pages of a fresh fork copies both.
    bm.fork("a", "c")
    ops = bm.prepare_write("c", 0, 6)
    assert [src for src, _ in ops] == [1, 2]
    assert bm.block_table("c") == [dst for _, dst in ops]
    assert_consistent(bm)

    # Freeing the parent leaves the children's pages alone.
    bm.free("a")
    assert bm.ref_count(1) == 1 and bm.block_table("b") == [1, 3]
    assert_consistent(bm)


def test_fork_a_prefix_shares_only_its_pages():
    bm = BlockManager(num_pages=8, page_size=4)
    bm.allocate_slots("a", 12)  # pages 1, 2, 3
    bm.fork("a", "b", num_tokens=5)
    assert bm.block_table("b") == [1, 2]
    assert bm.ref_count(3) == 1
    with pytest.raises(ValueError, match="cannot fork"):
        bm.fork("a", "c", num_tokens=13)
    with pytest.raises(ValueError, match="already holds"):
        bm.fork("a", "b")
    with pytest.raises(KeyError):
        bm.fork("nobody", "d")


def test_copy_on_write_refused_without_free_pages_changes_nothing():
    bm = BlockManager(num_pages=4, page_size=2)
    bm.allocate_slots("a", 4)  # pages 1, 2
    bm.fork("a", "b")
    bm.allocate_slots("c", 2)  # the last free page
    assert bm.prepare_write("b", 1, 3) is None
    assert bm.block_table("b") == [1, 2] and bm.ref_count(1) == 2
    bm.free("c")
    # One free page: enough for a write into page index 0, not for one spanning both pages.
    assert bm.prepare_write("b", 1, 3) is None
    assert bm.prepare_write("b", 1, 2) == [(1, 3)]
    assert bm.prepare_write("b", 2, 4) is None
    assert bm.block_table("b") == [3, 2]
    assert_consistent(bm)


def test_prepare_write_range_must_be_allocated():
    bm = BlockManager(num_pages=4, page_size=2)
    bm.allocate_slots("a", 3)
    with pytest.raises(ValueError, match="allocate slots first"):
        bm.prepare_write("a", 2, 5)
    assert bm.prepare_write("a", 2, 2) == []


def tokens(*pages):
    return [t for page in pages for t in page]


def lookup(bm: BlockManager, token_ids, cache_salt=None):
    """The prefix hit of a request with these tokens."""
    return bm.get_computed_pages(bm.hash_blocks(token_ids, cache_salt), len(token_ids))


def hit(bm: BlockManager, token_ids, cache_salt=None):
    """(device pages, tokens) of the prefix hit, for hits that stay on the device."""
    found = lookup(bm, token_ids, cache_salt)
    return list(found.pages), found.num_tokens


def publish(bm: BlockManager, rid: str, token_ids, num_computed: int, cache_salt=None):
    bm.cache_computed_pages(rid, bm.hash_blocks(token_ids, cache_salt), num_computed)


def test_prefix_hits_need_computed_full_pages_and_never_cover_the_last_token():
    bm = BlockManager(num_pages=10, page_size=4, enable_prefix_caching=True)
    prompt = tokens([1, 2, 3, 4], [5, 6, 7, 8], [9, 10])
    bm.allocate_slots("a", 10)
    assert hit(bm, prompt) == ([], 0)  # nothing computed yet
    publish(bm, "a", prompt, 6)  # only the first page is full and computed
    assert hit(bm, prompt) == ([1], 4)
    publish(bm, "a", prompt, 10)
    assert hit(bm, prompt) == ([1, 2], 8)
    # Exactly two pages: the last token must be computed, so only one page is a hit.
    assert hit(bm, prompt[:8]) == ([1], 4)
    assert hit(bm, prompt[:9]) == ([1, 2], 8)
    # A different second page ends the hit; a different first page means no hit at all.
    assert hit(bm, tokens([1, 2, 3, 4], [5, 6, 7, 0], [9])) == ([1], 4)
    assert hit(bm, tokens([0, 2, 3, 4], [5, 6, 7, 8], [9])) == ([], 0)
    # The chain hash names the whole prefix: the same page tokens after another prefix miss.
    assert hit(bm, tokens([5, 6, 7, 8], [1, 2, 3, 4], [9])) == ([], 0)
    # Lookups count nothing: an admission records its lookup once.
    assert (bm.num_prefix_query_tokens, bm.num_prefix_hit_tokens) == (0, 0)
    bm.record_admission(len(prompt), lookup(bm, prompt))
    bm.record_admission(9, lookup(bm, prompt[:9]))
    assert (bm.num_prefix_query_tokens, bm.num_prefix_hit_tokens) == (10 + 9, 8 + 8)
    assert bm.prefix_hit_rate == pytest.approx(16 / 19)
    # Without a host tier there are no external (host-tier) lookups.
    assert (bm.num_external_query_tokens, bm.num_external_hit_tokens) == (0, 0)


def test_cached_pages_survive_free_and_are_taken_back_on_a_hit():
    bm = BlockManager(num_pages=8, page_size=4, enable_prefix_caching=True)
    prompt = tokens([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11])
    bm.allocate_slots("a", 11)
    publish(bm, "a", prompt, 11)
    bm.free("a")
    assert bm.num_free_pages == 7 and bm.num_cached_free_pages == 2
    assert sorted(bm.cached_page_ids()) == [1, 2]
    assert_consistent(bm)

    found = lookup(bm, prompt)
    assert (found.pages, found.num_tokens) == ((1, 2), 8)
    added = bm.allocate_slots("b", 11, prefix_hit=found)
    assert added[:2] == [1, 2] and len(added) == 3
    assert bm.num_free_pages == 4 and bm.num_cached_free_pages == 0
    # b computes nothing new in those pages but keeps extending the chain from them.
    publish(bm, "b", prompt + [12], 12)
    assert hit(bm, prompt + [12, 13]) == (added, 12)
    # A running request sharing a hit takes a ref, no free page.
    free_before = bm.num_free_pages
    bm.allocate_slots("c", 8, prefix_hit=lookup(bm, prompt))
    assert bm.num_free_pages == free_before
    assert bm.ref_count(1) == 2
    assert_consistent(bm)


def test_cached_pages_are_evicted_lru_and_only_when_needed():
    bm = BlockManager(num_pages=7, page_size=2, enable_prefix_caching=True)  # 6 allocatable
    a = [1, 2, 3, 4, 5]
    c = [7, 8, 9, 10, 11]
    bm.allocate_slots("a", 5)  # pages 1, 2, 3
    publish(bm, "a", a, 5)  # pages 1, 2 cached
    bm.allocate_slots("c", 5)  # pages 4, 5, 6
    publish(bm, "c", c, 5)  # pages 4, 5 cached
    bm.free("a")  # LRU order now: 2, 1 (a's tail first)
    bm.free("c")  # then 5, 4
    assert bm.num_cached_free_pages == 4
    # Uncached free pages (3, 6) go first; hits stay intact.
    assert bm.allocate_slots("x", 4) == [3, 6]
    assert hit(bm, a) == ([1, 2], 4)
    assert hit(bm, c) == ([4, 5], 4)
    # Next comes the least recently freed cached page: a's tail (2), then a's head (1).
    assert bm.allocate_slots("x", 6) == [2]
    assert hit(bm, a) == ([1], 2)
    assert bm.allocate_slots("x", 8) == [1]
    assert hit(bm, a) == ([], 0)
    assert hit(bm, c) == ([4, 5], 4)
    assert_consistent(bm)


def test_a_revived_page_goes_back_to_the_lru_tail_when_freed():
    bm = BlockManager(num_pages=5, page_size=2, enable_prefix_caching=True)  # 4 allocatable
    a, c = [1, 2, 3], [4, 5, 6]
    for rid, toks in (("a", a), ("c", c)):
        bm.allocate_slots(rid, 3)
        publish(bm, rid, toks, 3)
        bm.free(rid)
    # LRU: a's page, then c's page (uncached tails went to the uncached pool).
    pages, _ = hit(bm, a)
    bm.allocate_slots("a2", 3, prefix_hit=lookup(bm, a))  # takes a's page and one uncached page
    bm.free("a2")  # a's page is now the most recently freed
    bm.allocate_slots("x", 6)  # needs 3: the 2 uncached pages, then evicts c's page
    assert hit(bm, c) == ([], 0)
    assert hit(bm, a) == (pages, 2)


def test_duplicate_prefix_keeps_the_first_page_and_the_copy_stays_private():
    bm = BlockManager(num_pages=8, page_size=2, enable_prefix_caching=True)
    toks = [1, 2, 3]
    bm.allocate_slots("a", 3)
    bm.allocate_slots("b", 3)  # computed concurrently, no hit possible
    publish(bm, "a", toks, 3)
    publish(bm, "b", toks, 3)
    assert bm.cached_page_ids() == [bm.block_table("a")[0]]
    bm.free("b")
    assert bm.num_cached_free_pages == 0
    assert hit(bm, toks) == ([bm.block_table("a")[0]], 2)


def test_writing_a_private_cached_page_drops_it_from_the_cache():
    bm = BlockManager(num_pages=6, page_size=2, enable_prefix_caching=True)
    toks = [1, 2, 3]
    bm.allocate_slots("a", 3)
    publish(bm, "a", toks, 3)
    assert bm.prepare_write("a", 1, 2) == []
    assert hit(bm, toks) == ([], 0)
    # A shared cached page is copied instead and stays cached for the others.
    publish(bm, "a", toks, 3)  # already hashed for a: no re-publication
    assert bm.cached_page_ids() == []
    bm.allocate_slots("b", 3)
    publish(bm, "b", toks, 3)
    bm.fork("b", "c")
    [(src, dst)] = bm.prepare_write("c", 1, 2)
    assert bm.cached_page_ids() == [src] and dst not in bm.cached_page_ids()
    assert_consistent(bm)


def test_fork_keeps_hashes_only_for_pages_filled_by_the_shared_tokens():
    bm = BlockManager(num_pages=10, page_size=2, enable_prefix_caching=True)
    a = [1, 2, 3, 4, 5]
    bm.allocate_slots("a", 5)
    publish(bm, "a", a, 5)  # pages of [1,2] and [3,4]
    bm.fork("a", "b", num_tokens=3)  # b = [1, 2, 3, ...]: its second page is not a's
    b = [1, 2, 3, 9, 9]
    bm.prepare_write("b", 2, 4)
    bm.allocate_slots("b", 5)
    publish(bm, "b", b, 5)
    pages, n = hit(bm, b + [0])
    assert n == 4 and pages == bm.block_table("b")[:2]


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_pages=6, page_size=2)
    bm.allocate_slots("a", 5)
    publish(bm, "a", [1, 2, 3, 4, 5], 5)
    bm.free("a")
    assert hit(bm, [1, 2, 3, 4, 5]) == ([], 0)
    assert bm.num_cached_free_pages == 0 and bm.prefix_hit_rate == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_pages=1, page_size=4), "num_pages must be >= 2"),
    (dict(num_pages=0, page_size=4), "num_pages must be a positive"),
    (dict(num_pages=4, page_size=0), "page_size must be a positive"),
    (dict(num_pages=4, page_size=2, watermark_pages=3), "watermark_pages"),
    (dict(num_pages=4, page_size=2, watermark_pages=-1), "watermark_pages"),
])
def test_constructor_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockManager(**kwargs)


def test_bad_allocations_are_rejected():
    bm = BlockManager(num_pages=6, page_size=2, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="non-negative"):
        bm.allocate_slots("a", -1)
    stale = PrefixHit((1,), (), tuple(bm.hash_blocks([1, 2, 3])), 2)
    with pytest.raises(ValueError, match="not in the prefix cache"):
        bm.allocate_slots("a", 4, prefix_hit=stale)
    bm.allocate_slots("a", 3)
    publish(bm, "a", [1, 2, 3], 3)
    found = lookup(bm, [1, 2, 3])
    with pytest.raises(ValueError, match="for admission"):
        bm.allocate_slots("a", 4, prefix_hit=found)
    with pytest.raises(ValueError, match="repeats"):
        bm.allocate_slots("b", 4, prefix_hit=PrefixHit((1, 1), (), found.hashes * 2, 2))
    with pytest.raises(ValueError, match="get_computed_pages"):
        bm.allocate_slots("b", 4, prefix_hit=PrefixHit((1,), (), found.hashes, 4))
    with pytest.raises(ValueError, match="holds 2 pages"):
        publish(bm, "a", list(range(10)), 10)
    with pytest.raises(KeyError):
        bm.block_table("nobody")
