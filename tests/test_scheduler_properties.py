"""Property tests: random operation sequences on the block manager and the scheduler.

Every example runs a fixed number of operations and checks the invariants after each one, so the
totals are exact: 40 x 100 block-manager operations and 100 x 100 scheduler operations.

Invariants: no page both free and referenced; a page's ref count equals the number of block
tables holding it; used + free == allocatable; page 0 is never handed out; a page in two tables
holds the same prefix in both (shared by a fork or a prefix hit); nobody writes a page it shares;
prefix hits return pages whose KV is exactly the queried prefix; a refused operation changes
nothing; every request finishes exactly once; at the end nothing leaks and every request that
ran to its end produced what the fake model produces for it alone.

With a host KV tier: host slots are never lost or doubly used; every host entry holds exactly
the KV its hash names (applying the runner's copy order: a step's offloads land at the next
step's start), so a reload is never stale. Prompts with different `cache_salt`s never share a
page. Each request's tokens are hashed once, and lookups are counted once per admission.
"""

from __future__ import annotations

import collections

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jaxinfer.engine import block_manager as block_manager_module
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.request import Request
from jaxinfer.engine.scheduler import Scheduler, SchedulerConfig
from tests.test_scheduler import FakeModel, FakeRunner, generate_alone

OPS_PER_EXAMPLE = 100
BM_EXAMPLES = 40
SCHEDULER_EXAMPLES = 100
_SETTINGS = dict(deadline=None, derandomize=False,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_pages(bm: BlockManager) -> dict[int, list[tuple[str, int]]]:
    """Structural invariants; returns page -> [(request id, table index)] of its holders."""
    holders = collections.defaultdict(list)
    for rid in bm.request_ids():
        for index, page in enumerate(bm.block_table(rid)):
            holders[page].append((rid, index))
    assert 0 not in holders, "page 0 is reserved"
    free = bm.free_page_ids()
    assert len(free) == len(set(free)) == bm.num_free_pages
    assert 0 not in free
    assert not set(free) & set(holders), "a page is both free and referenced"
    for page in range(1, bm.num_pages):
        assert bm.ref_count(page) == len(holders.get(page, ())), page
    assert len(holders) + len(free) == bm.num_allocatable_pages
    assert set(bm.cached_page_ids()) <= set(range(1, bm.num_pages))
    host_slots = [slot for _, slot in bm.host.items()] + bm.host.free_slots()
    assert sorted(host_slots) == list(range(bm.host.num_slots)), "a host slot is lost or doubly used"
    return holders


def run_checked(driver, ops):
    """Applies each (method name, *args) op to the driver and checks its invariants after it."""
    done = 0
    for name, *args in ops:
        getattr(driver, name)(*args)
        driver.check()
        done += 1
    assert done == OPS_PER_EXAMPLE


def snapshot(bm: BlockManager):
    tables = {rid: bm.block_table(rid) for rid in bm.request_ids()}
    return tables, bm.free_page_ids(), sorted(bm.cached_page_ids()), bm.host.items()


SALTS = (None, "tenant-a", "tenant-b")


# ----- block manager ------------------------------------------------------------------------------

_bm_op = st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 2), st.integers(0, 12), st.integers(1, 14), st.integers(0, 99)),
    st.tuples(st.just("grow"), st.integers(0, 99), st.integers(1, 6)),
    st.tuples(st.just("fork"), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("free"), st.integers(0, 99)),
)


class _BlockManagerModel:
    """Drives a BlockManager like a runner would and mirrors each KV slot's contents.

    A slot's content is the request's cache salt and the token prefix up to and including its
    position, so a correct prefix hit, copy or reload is recognisable exactly. The host tier is
    mirrored the way the runner applies it: a step's offloads read their device pages first and
    land in the host pool at the next step's start; reloads read the host pool.
    """

    def __init__(self, bm: BlockManager, rng_tokens: list[list[int]]):
        self.bm = bm
        self.prefixes = rng_tokens
        self.slots = [[None] * bm.page_size for _ in range(bm.num_pages)]
        self.host: dict[int, list] = {}
        self.landing: list[tuple[int, list]] = []
        self.tokens: dict[str, list[int]] = {}
        self.salts: dict[str, str | None] = {}
        self.hashes: dict[str, list[bytes]] = {}
        self.page_contents: dict[bytes, list] = {}  # hash -> the slot contents it names
        self.computed: dict[str, int] = {}
        self.counter = 0
        self.num_reloads = 0

    def _pick(self, index):
        rids = sorted(self.tokens)
        return rids[index % len(rids)] if rids else None

    def _content(self, rid: str, pos: int):
        return (self.salts[rid], tuple(self.tokens[rid][:pos + 1]))

    def _track(self, rid: str, token_ids: list[int], salt):
        self.tokens[rid], self.salts[rid] = token_ids, salt
        self.hashes[rid] = self.bm.hash_blocks(token_ids, salt)
        ps = self.bm.page_size
        for i, digest in enumerate(self.hashes[rid]):
            self.page_contents[digest] = [self._content(rid, i * ps + off) for off in range(ps)]

    def _transfer(self):
        offloads, reloads = self.bm.take_transfer_ops()
        for slot, contents in self.landing:
            self.host[slot] = contents
        self.landing = [(slot, list(self.slots[page])) for page, slot in offloads]
        for slot, page in reloads:
            self.slots[page] = list(self.host[slot])
        self.num_reloads += len(reloads)

    def _write(self, rid: str, start: int, end: int):
        table, ps = self.bm.block_table(rid), self.bm.page_size
        for pos in range(start, end):
            page = table[pos // ps]
            assert self.bm.ref_count(page) == 1, f"{rid} writes page {page}, which it shares"
            self.slots[page][pos % ps] = self._content(rid, pos)
        self.computed[rid] = end
        self.bm.cache_computed_pages(rid, self.hashes[rid], end)

    def admit(self, prefix_index, prefix_len, tail_len, salt):
        rid = f"q{self.counter}"
        self.counter += 1
        token_ids = self.prefixes[prefix_index][:prefix_len] + [(salt * 7 + k) % 5 for k in range(tail_len)]
        token_ids = token_ids + [salt % 5] * 8  # room to grow
        prompt_len = len(token_ids) - 8
        cache_salt = SALTS[salt % len(SALTS)]
        hashes = self.bm.hash_blocks(token_ids, cache_salt)
        hit = self.bm.get_computed_pages(hashes, prompt_len)
        num_cached = hit.num_tokens
        assert num_cached == len(hit.pages) * self.bm.page_size and num_cached < prompt_len
        before = snapshot(self.bm)
        num_new = min(prompt_len - num_cached, 5)
        added = self.bm.allocate_slots(rid, num_cached + num_new, prefix_hit=hit)
        if added is None:
            assert snapshot(self.bm) == before, "a refused admission changed state"
            assert self.bm.take_transfer_ops() == ([], []), "a refused admission asked for copies"
            assert self.bm.pages_for(num_cached + num_new) - len(hit.pages) + sum(
                p != 0 and self.bm.ref_count(p) == 0 for p in hit.pages) + len(hit.host_slots) \
                > self.bm.num_admissible_pages
            return
        assert [p for p in added[:len(hit.pages)] if p in hit.pages] == [p for p in hit.pages if p]
        assert set(added) - set(hit.pages) <= set(before[1])
        self._track(rid, token_ids, cache_salt)
        self._transfer()
        for pos in range(num_cached):  # the hit, reloads included, is exactly this prefix's KV
            page = added[pos // self.bm.page_size]
            assert self.slots[page][pos % self.bm.page_size] == self._content(rid, pos), "a stale prefix hit"
        self._write(rid, num_cached, num_cached + num_new)

    def grow(self, index, n):
        rid = self._pick(index)
        if rid is None:
            return
        start = self.computed[rid]
        end = min(start + n, len(self.tokens[rid]))
        before = snapshot(self.bm)
        if self.bm.allocate_slots(rid, end) is None:
            assert snapshot(self.bm) == before
            return
        free_before = set(self.bm.free_page_ids())
        table_before = self.bm.block_table(rid)
        ops = self.bm.prepare_write(rid, start, end)
        self._transfer()
        if ops is None:
            assert self.bm.block_table(rid) == table_before and set(self.bm.free_page_ids()) == free_before
            return
        for src, dst in ops:
            assert src in table_before and dst in free_before
            self.slots[dst] = list(self.slots[src])
        self._write(rid, start, end)

    def fork(self, parent_index, num_tokens_seed, salt):
        parent = self._pick(parent_index)
        if parent is None:
            return
        child = f"q{self.counter}"
        self.counter += 1
        num_tokens = num_tokens_seed % (self.computed[parent] + 1)
        self.bm.fork(parent, child, num_tokens=num_tokens)
        assert self.bm.block_table(child) == self.bm.block_table(parent)[:self.bm.pages_for(num_tokens)]
        self._track(child, self.tokens[parent][:num_tokens] + [(salt + k) % 5 for k in range(8)], self.salts[parent])
        self.computed[child] = num_tokens

    def free(self, index):
        rid = self._pick(index)
        if rid is not None:
            self.bm.free(rid)
            del self.tokens[rid], self.computed[rid]

    def check(self):
        holders = check_pages(self.bm)
        ps = self.bm.page_size
        for page, held in holders.items():
            for rid, index in held[1:]:
                first, first_index = held[0]
                assert index == first_index, "a shared page at different positions"
                assert self.salts[rid] == self.salts[first], "requests of different cache salts share a page"
                end = min((index + 1) * ps, self.computed[rid], self.computed[first])
                assert self.tokens[rid][:end] == self.tokens[first][:end], "a shared page with different prefixes"
        host = dict(self.host)
        host.update(self.landing)  # what each slot will hold once this step's offloads land
        for digest, slot in self.bm.host.items():
            assert host[slot] == self.page_contents[digest], "a host slot does not hold the KV its hash names"


def _run_block_manager(page_size, num_pages, watermark, prefix_caching, num_host_pages, prefixes, ops):
    bm = BlockManager(num_pages, page_size, enable_prefix_caching=prefix_caching,
                      watermark_pages=min(watermark, num_pages - 2),
                      num_host_pages=num_host_pages if prefix_caching else 0)
    model = _BlockManagerModel(bm, prefixes)
    run_checked(model, ops)
    for rid in list(model.tokens):
        model.free(0)
    check_pages(bm)
    assert bm.num_free_pages == bm.num_allocatable_pages
    event(f"host-tier reloads: {model.num_reloads > 0}")


_prefixes = st.lists(st.lists(st.integers(0, 4), min_size=12, max_size=12), min_size=3, max_size=3)
_bm_ops = st.lists(_bm_op, min_size=OPS_PER_EXAMPLE, max_size=OPS_PER_EXAMPLE)


@settings(max_examples=BM_EXAMPLES, **_SETTINGS)
@given(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(4, 24), watermark=st.integers(0, 2),
       prefix_caching=st.booleans(), num_host_pages=st.sampled_from([0, 0, 1, 3, 8]), prefixes=_prefixes,
       ops=_bm_ops)
def test_block_manager_random_operations(page_size, num_pages, watermark, prefix_caching, num_host_pages,
                                         prefixes, ops):
    _run_block_manager(page_size, num_pages, watermark, prefix_caching, num_host_pages, prefixes, ops)


# Admissions of long shared prefixes, so evicted prefixes are asked for again.
_bm_host_op = st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 2), st.integers(6, 12), st.integers(1, 6), st.integers(0, 99)),
    st.tuples(st.just("grow"), st.integers(0, 99), st.integers(1, 6)),
    st.tuples(st.just("fork"), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("free"), st.integers(0, 99)),
)


@settings(max_examples=BM_EXAMPLES, **_SETTINGS)
@given(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(4, 10), watermark=st.integers(0, 1),
       num_host_pages=st.integers(1, 8), prefixes=_prefixes,
       ops=st.lists(_bm_host_op, min_size=OPS_PER_EXAMPLE, max_size=OPS_PER_EXAMPLE))
def test_block_manager_host_tier_random_operations(page_size, num_pages, watermark, num_host_pages, prefixes, ops):
    """Small device pools, so cached pages keep moving through the host tier and back."""
    _run_block_manager(page_size, num_pages, watermark, True, num_host_pages, prefixes, ops)


# ----- scheduler ----------------------------------------------------------------------------------

_scheduler_op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 10), st.integers(1, 10), st.integers(1, 16),
              st.integers(0, 3), st.integers(0, 2), st.integers(0, 2), st.integers(0, 999)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 999)),
    st.tuples(st.just("finish"), st.integers(0, 999), st.sampled_from(["stop", "length"])),
    st.tuples(st.just("pressure"), st.integers(0, 999)),
)


def _count_calls(module, name: str):
    """Counts calls of module.name from now until the returned counter's `restore()`; calling
    the counter returns the count."""
    original = getattr(module, name)
    calls = [0]

    def counted(*args):
        calls[0] += 1
        return original(*args)

    setattr(module, name, counted)
    counter = lambda: calls[0]  # noqa: E731
    counter.restore = lambda: setattr(module, name, original)
    return counter


class _SchedulerDriver:
    """Feeds random operations to a Scheduler, with the fake runner as its device."""

    def __init__(self, scheduler: Scheduler, prefixes: list[list[int]]):
        self.s = scheduler
        self.bm = scheduler.block_manager
        self.model = FakeModel(vocab_size=12)
        self.runner = FakeRunner(self.model, self.bm.num_pages, self.bm.page_size)
        self.prefixes = prefixes
        self.requests: dict[str, Request] = {}
        self.finish_events = collections.Counter()
        self.finished_from_outside: set[str] = set()
        self.counter = 0
        self.clock = 0
        self.num_refused = 0
        self.num_hashes = _count_calls(block_manager_module, "_chain_hash")

    def _fits(self, prompt_len, max_tokens) -> bool:
        config, bm = self.s.config, self.bm
        if prompt_len > config.max_model_len:
            return False
        longest = min(config.max_model_len, prompt_len + max_tokens)
        return bm.pages_for(max(prompt_len, longest - 1)) <= bm.num_allocatable_pages - bm.watermark_pages

    def add(self, prefix_index, prefix_len, tail_len, max_tokens, min_tokens, priority, num_siblings, salt):
        prompt = self.prefixes[prefix_index][:prefix_len] + [(salt * 5 + k) % 12 for k in range(tail_len)]
        kwargs = dict(max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens), eos_token_ids=[salt % 12],
                      stop_token_ids=[salt % 7] if salt % 3 == 0 else [], ignore_eos=salt % 5 == 0,
                      priority=priority, arrival_time=self.clock)
        self.clock += 1
        leader_id = None
        cache_salt = SALTS[salt % len(SALTS)]
        for k in range(num_siblings + 1):
            rid = f"r{self.counter}"
            self.counter += 1
            request = Request(rid, prompt, cache_salt=cache_salt, **kwargs)
            num_waiting = self.s.num_waiting
            try:
                self.s.add_request(request, fork_from=leader_id)
            except ValueError:
                assert not self._fits(len(prompt), max_tokens), "a request that fits was refused"
                assert self.s.num_waiting == num_waiting and self.s.get_request(rid) is None
                self.num_refused += 1
                return
            assert self._fits(len(prompt), max_tokens)
            self.requests[rid] = request
            self.runner.seeds[rid] = salt * 31 + k
            leader_id = leader_id or rid

    def pressure(self, salt):
        """A request as long as the pool allows, to force preemptions."""
        config, bm = self.s.config, self.bm
        max_kv = min(config.max_model_len, (bm.num_allocatable_pages - bm.watermark_pages) * bm.page_size)
        prompt_len = max(1, max_kv // 2)
        self.add(salt % 3, 0, prompt_len, max(1, max_kv - prompt_len), 0, salt % 3, 0, salt)

    def step(self, num_steps):
        for _ in range(num_steps):
            queries_before = self.bm.num_prefix_query_tokens
            out = self.s.schedule()
            assert out.total_num_scheduled_tokens <= self.s.config.max_num_batched_tokens
            # Lookups are counted for admissions only: requests the runner sees for the first
            # time or back from preemption, with all their tokens.
            admitted = sum(len(r.token_ids) for r in out.scheduled_new_reqs) + sum(
                len(self.runner.batch[r.request_id].token_ids) + len(r.new_token_ids)
                for r in out.scheduled_cached_reqs if self.runner.batch[r.request_id].block_table is None)
            if self.bm.enable_prefix_caching:
                assert self.bm.num_prefix_query_tokens - queries_before <= admitted, "a lookup counted twice"
            sampled = self.runner.execute(out)
            for request in self.s.update_from_output(out, sampled):
                if request.is_finished:
                    self.finish_events[request.request_id] += 1

    def _pick(self, index):
        rids = list(self.requests)
        return rids[index % len(rids)] if rids else None

    def abort(self, index):
        rid = self._pick(index)
        for request in self.s.abort_requests([rid] if rid else []):
            self.finish_events[request.request_id] += 1

    def finish(self, index, reason):
        rid = self._pick(index)
        for request in self.s.finish_requests([rid] if rid else [], reason):
            self.finish_events[request.request_id] += 1
            self.finished_from_outside.add(rid)

    def check(self):
        holders = check_pages(self.bm)
        s, ps = self.s, self.bm.page_size
        with_pages = set(self.bm.request_ids())
        unfinished = [r for r in self.requests.values() if not r.is_finished]
        running = {r.request_id for r in unfinished if r.status.name == "RUNNING"}
        assert with_pages == running, "exactly the running requests hold pages"
        assert (s.num_running, s.num_waiting) == (len(running), len(unfinished) - len(running))
        assert s.num_running <= s.config.max_num_seqs
        for rid in running:
            request = self.requests[rid]
            assert self.bm.num_request_pages(rid) >= self.bm.pages_for(request.num_computed_tokens)
        for page, held in holders.items():
            (first, index), others = held[0], held[1:]
            for rid, other_index in others:
                assert other_index == index, "a shared page at different positions"
                end = (index + 1) * ps
                a, b = self.requests[first].all_token_ids, self.requests[rid].all_token_ids
                assert len(a) >= end and len(b) >= end and a[:end] == b[:end], "a page shared without a common prefix"
                assert self.requests[first].cache_salt == self.requests[rid].cache_salt, "salts differ on a shared page"
        for rid, request in self.requests.items():
            assert self.finish_events[rid] == (1 if request.is_finished else 0), rid
            assert (s.get_request(rid) is None) == request.is_finished

    def drain(self):
        for _ in range(100_000):
            if not self.s.has_unfinished_requests():
                break
            self.step(1)
        assert not self.s.has_unfinished_requests(), "the scheduler does not make progress"
        self.runner.execute(self.s.schedule())
        self.check()
        assert self.runner.batch == {}
        assert self.bm.num_free_pages == self.bm.num_allocatable_pages and list(self.bm.request_ids()) == []
        # What the example exercised, for --hypothesis-show-statistics.
        event(f"preempted: {self.s.num_preemptions_total > 0}")
        event(f"copy-on-write: {self.runner.num_copies > 0}")
        event(f"prefix hits: {self.s.prefix_cache_hit_rate > 0}")
        event(f"host-tier reloads: {self.runner.num_reloads > 0}")
        if self.bm.enable_prefix_caching:  # every token hashed exactly once, however often looked up
            assert self.num_hashes() == sum(len(r.all_token_ids) // self.bm.page_size for r in self.requests.values())
        event(f"refused a request: {self.num_refused > 0}")
        for rid, request in self.requests.items():
            expected, reason = generate_alone(self.model, request, self.runner.seeds[rid], self.s.config.max_model_len)
            if request.finish_reason == "abort" or rid in self.finished_from_outside:
                assert request.output_token_ids == expected[:request.num_output_tokens], rid
            else:
                assert (request.output_token_ids, request.finish_reason) == (expected, reason), rid


@settings(max_examples=SCHEDULER_EXAMPLES, **_SETTINGS)
@given(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(6, 24), watermark=st.integers(0, 1),
       max_num_seqs=st.integers(1, 5), budget=st.integers(1, 16), max_model_len=st.integers(4, 40),
       policy=st.sampled_from(["fcfs", "priority"]), threshold=st.integers(0, 5), prefix_caching=st.booleans(),
       num_host_pages=st.sampled_from([0, 2, 6]), prefixes=st.lists(st.lists(st.integers(0, 11), min_size=10, max_size=10), min_size=3, max_size=3),
       ops=st.lists(_scheduler_op, min_size=OPS_PER_EXAMPLE, max_size=OPS_PER_EXAMPLE))
def test_scheduler_random_operations(page_size, num_pages, watermark, max_num_seqs, budget, max_model_len,
                                     policy, threshold, prefix_caching, num_host_pages, prefixes, ops):
    bm = BlockManager(num_pages, page_size, enable_prefix_caching=prefix_caching, watermark_pages=watermark,
                      num_host_pages=num_host_pages if prefix_caching else 0)
    config = SchedulerConfig(max_num_seqs, budget, max_model_len, page_size, policy, threshold)
    driver = _SchedulerDriver(Scheduler(config, bm), prefixes)
    try:
        run_checked(driver, ops)
        driver.drain()
    finally:
        driver.num_hashes.restore()
