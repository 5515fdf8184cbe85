"""Scheduler: hand-worked steps, then a host-only simulation against a fake model run alone.

The fake runner below follows the runner contract of `jaxinfer.engine.scheduler` literally: it
keeps a persistent batch, applies the output's diffs and copy ops, and "computes" KV into a fake
page pool, where the KV of position p is a hash of the KV at p - 1 (read back from the pool
through the block table) and the token at p. A wrong block table, a missed copy, a bad prefix
hit or a stale page therefore changes the sampled tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random

import pytest

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.request import Request, RequestStatus
from jaxinfer.engine.scheduler import Scheduler, SchedulerConfig

_MASK = (1 << 64) - 1
ROOT_KV = 0x5EED


def mix(*values: int) -> int:
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & _MASK)) * 0xBF58476D1CE4E5B9) & _MASK
        h ^= h >> 29
    return h


@dataclasses.dataclass(frozen=True)
class FakeModel:
    """KV at position p = f(KV at p - 1, token p, p); the next token = g(last KV, seed)."""

    vocab_size: int

    def kv(self, prev_kv: int, token: int, position: int) -> int:
        return mix(prev_kv, token, position)

    def next_token(self, kv: int, seed: int) -> int:
        return mix(kv, seed) % self.vocab_size


def generate_alone(model: FakeModel, request: Request, seed: int, max_model_len: int) -> tuple[list[int], str]:
    """The request's outputs and finish reason when it runs by itself, token after token."""
    kv = ROOT_KV
    for pos, token in enumerate(request.prompt_token_ids):
        kv = model.kv(kv, token, pos)
    outputs = []
    while True:
        token = model.next_token(kv, seed)
        outputs.append(token)
        if len(outputs) > request.min_tokens and (
                token in request.stop_token_ids or (not request.ignore_eos and token in request.eos_token_ids)):
            return outputs, "stop"
        if request.num_prompt_tokens + len(outputs) >= max_model_len or len(outputs) == request.max_tokens:
            return outputs, "length"
        kv = model.kv(kv, token, request.num_prompt_tokens + len(outputs) - 1)


@dataclasses.dataclass
class _BatchEntry:
    token_ids: list[int]
    block_table: list[int] | None  # None while preempted


class FakeRunner:
    """Applies SchedulerOutputs to a persistent batch and a fake KV pool; returns sampled tokens."""

    def __init__(self, model: FakeModel, num_pages: int, page_size: int):
        self.model = model
        self.page_size = page_size
        self.kv_pages = [[None] * page_size for _ in range(num_pages)]
        self.batch: dict[str, _BatchEntry] = {}
        self.seeds: dict[str, int] = {}
        self.num_copies = 0
        # The host KV tier: slot -> page contents; a step's offloads land at the next step's start.
        self.host_pages: dict[int, list] = {}
        self._landing: list[tuple[int, list]] = []
        self.num_offloads = self.num_reloads = 0

    def _slot(self, table: list[int], pos: int) -> tuple[int, int]:
        return table[pos // self.page_size], pos % self.page_size

    def transfer(self, out):
        """The host tier's copies, in the runner's order: the previous step's offloads land, this
        step's offloads read their pages, then reloads read the host pool."""
        for slot, contents in self._landing:
            self.host_pages[slot] = contents
        self._landing = [(slot, list(self.kv_pages[page])) for page, slot in out.offload_ops]
        for slot, page in out.reload_ops:
            self.kv_pages[page] = list(self.host_pages[slot])
        self.num_offloads += len(out.offload_ops)
        self.num_reloads += len(out.reload_ops)

    def execute(self, out) -> dict[str, list[int]]:
        for rid in out.finished_req_ids:
            del self.batch[rid]
        for rid in out.preempted_req_ids:
            self.batch[rid].block_table = None
        start_of = {}
        for new in out.scheduled_new_reqs:
            assert new.request_id not in self.batch, "a request was sent as new twice"
            self.batch[new.request_id] = _BatchEntry(list(new.token_ids), list(new.block_table))
            start_of[new.request_id] = new.num_computed_tokens
        for cached in out.scheduled_cached_reqs:
            entry = self.batch[cached.request_id]
            entry.token_ids.extend(cached.new_token_ids)
            if cached.replaces_block_table:
                entry.block_table = list(cached.new_page_ids)
            else:
                assert entry.block_table is not None, "a preempted request came back without its table"
                entry.block_table.extend(cached.new_page_ids)
            start_of[cached.request_id] = cached.num_computed_tokens
        self.transfer(out)
        for src, dst in out.copy_ops:
            self.kv_pages[dst] = list(self.kv_pages[src])
            self.num_copies += 1
        holders = collections.Counter(p for e in self.batch.values() if e.block_table for p in e.block_table)

        offset, sampling, logits_indices, last_kv = 0, [], [], {}
        for rid in out.scheduled_req_ids:
            entry, start, n = self.batch[rid], start_of[rid], out.num_scheduled_tokens[rid]
            table = entry.block_table
            assert 0 not in table, "page 0 is reserved"
            assert start + n <= len(entry.token_ids) and start + n <= len(table) * self.page_size
            kv = None
            for pos in range(start, start + n):
                if pos == 0:
                    prev = ROOT_KV
                else:
                    page, off = self._slot(table, pos - 1)
                    prev = self.kv_pages[page][off]
                    assert prev is not None, f"{rid} reads unwritten KV at position {pos - 1}"
                kv = self.model.kv(prev, entry.token_ids[pos], pos)
                page, off = self._slot(table, pos)
                assert holders[page] == 1, f"{rid} writes page {page}, which is shared"
                self.kv_pages[page][off] = kv
            offset += n
            if start + n == len(entry.token_ids):
                sampling.append(rid)
                logits_indices.append(offset - 1)
                last_kv[rid] = kv
        assert offset == out.total_num_scheduled_tokens
        assert list(out.sampling_req_ids) == sampling
        assert list(out.logits_token_indices) == logits_indices
        return {rid: [self.model.next_token(last_kv[rid], self.seeds[rid])] for rid in sampling}


# ----- hand-worked steps -------------------------------------------------------------------------

_clock = itertools.count()


def make_scheduler(*, num_pages=64, page_size=4, max_num_seqs=8, budget=64, max_model_len=64,
                   policy="fcfs", prefix_caching=False, watermark=0, threshold=0) -> Scheduler:
    bm = BlockManager(num_pages, page_size, enable_prefix_caching=prefix_caching, watermark_pages=watermark)
    config = SchedulerConfig(max_num_seqs, budget, max_model_len, page_size, policy, threshold)
    return Scheduler(config, bm)


def make_request(rid, prompt, **kwargs) -> Request:
    if isinstance(prompt, int):
        prompt = [100 + i for i in range(prompt)]
    kwargs.setdefault("arrival_time", next(_clock))
    kwargs.setdefault("max_tokens", 8)
    return Request(rid, prompt, **kwargs)


def run_step(scheduler, tokens=None, default=7):
    """One step in which every sampling request gets `tokens[rid]` (or `default`)."""
    out = scheduler.schedule()
    sampled = {rid: [(tokens or {}).get(rid, default)] for rid in out.sampling_req_ids}
    return out, scheduler.update_from_output(out, sampled)


def test_chunked_prefill_then_decode_mixed_with_a_new_prefill():
    s = make_scheduler(budget=8)
    a = make_request("a", 20)
    s.add_request(a)
    out, _ = run_step(s)
    [new] = out.scheduled_new_reqs
    assert (new.request_id, new.token_ids, new.block_table, new.num_computed_tokens) == ("a", a.prompt_token_ids, (1, 2), 0)
    assert out.num_scheduled_tokens == {"a": 8} and out.sampling_req_ids == ()
    out, _ = run_step(s)
    [cached] = out.scheduled_cached_reqs
    assert (cached.new_page_ids, cached.num_computed_tokens, cached.new_token_ids) == ((3, 4), 8, ())
    out, changed = run_step(s, {"a": 42})
    assert out.num_scheduled_tokens == {"a": 4}
    assert out.sampling_req_ids == ("a",) and out.logits_token_indices == (3,)
    assert changed == [a] and a.output_token_ids == [42] and a.num_computed_tokens == 20

    b = make_request("b", 6)
    s.add_request(b)
    out, _ = run_step(s)
    assert out.scheduled_req_ids == ("a", "b")
    assert out.num_scheduled_tokens == {"a": 1, "b": 6} and out.total_num_scheduled_tokens == 7
    [cached] = out.scheduled_cached_reqs
    assert (cached.new_page_ids, cached.num_computed_tokens, cached.new_token_ids) == ((6,), 20, (42,))
    assert out.scheduled_new_reqs[0].block_table == (7, 8)
    assert out.sampling_req_ids == ("a", "b") and out.logits_token_indices == (0, 6)


def test_the_last_admitted_request_gets_a_partial_chunk():
    s = make_scheduler(budget=10)
    s.add_request(make_request("a", 4))
    s.add_request(make_request("b", 10))
    s.add_request(make_request("c", 1))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 4, "b": 6}
    assert out.sampling_req_ids == ("a",)
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 4, "c": 1}
    assert out.sampling_req_ids == ("a", "b", "c") and out.logits_token_indices == (0, 4, 5)


def test_long_prefill_threshold_caps_each_request_per_step():
    s = make_scheduler(budget=10, threshold=3)
    s.add_request(make_request("a", 8))
    s.add_request(make_request("b", 2))
    steps = [run_step(s)[0].num_scheduled_tokens for _ in range(3)]
    assert steps == [{"a": 3, "b": 2}, {"a": 3, "b": 1}, {"a": 2, "b": 1}]


def test_max_num_seqs_limits_running_requests_and_decodes_batch():
    s = make_scheduler(max_num_seqs=2)
    s.add_request(make_request("a", 3, max_tokens=2))
    s.add_request(make_request("b", 3))
    s.add_request(make_request("c", 3))
    out, _ = run_step(s)
    assert out.scheduled_req_ids == ("a", "b") and out.logits_token_indices == (2, 5)
    assert (s.num_running, s.num_waiting) == (2, 1)
    out, changed = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1} and out.logits_token_indices == (0, 1)
    a = changed[0]
    assert a.status is RequestStatus.FINISHED_LENGTH and a.finish_reason == "length"
    out, _ = run_step(s)
    assert out.finished_req_ids == {"a"}
    assert out.num_scheduled_tokens == {"b": 1, "c": 3}


@pytest.mark.parametrize("policy, expected", [("fcfs", ["lo", "hi", "hi2"]), ("priority", ["hi", "hi2", "lo"])])
def test_admission_order_follows_the_policy(policy, expected):
    s = make_scheduler(max_num_seqs=1, policy=policy)
    s.add_request(make_request("lo", 2, priority=5, max_tokens=1))
    s.add_request(make_request("hi", 2, priority=1, max_tokens=1))
    s.add_request(make_request("hi2", 2, priority=1, max_tokens=1))
    assert [run_step(s)[0].scheduled_req_ids[0] for _ in range(3)] == expected
    assert not s.has_unfinished_requests()


def test_preemption_frees_the_last_running_request_and_it_resumes_with_its_outputs():
    s = make_scheduler(num_pages=5, page_size=2)  # 4 allocatable pages
    a = make_request("a", 3, max_tokens=4)
    b = make_request("b", 3, max_tokens=4)
    s.add_request(a)
    s.add_request(b)
    out, _ = run_step(s, default=11)
    assert [r.block_table for r in out.scheduled_new_reqs] == [(1, 2), (3, 4)]
    run_step(s, default=12)  # positions 3 fit in the second pages
    out, _ = run_step(s, default=13)  # a needs a third page: b goes
    assert out.scheduled_req_ids == ("a",) and out.preempted_req_ids == {"b"}
    assert out.scheduled_cached_reqs[0].new_page_ids == (4,)
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [11, 12] and b.num_preemptions == 1
    assert (s.num_preemptions_total, s.num_running, s.num_waiting) == (1, 1, 1)
    assert not s.block_manager.has_request("b")
    out, changed = run_step(s, default=14)  # b needs 3 pages for 5 tokens, 1 is free
    assert out.scheduled_req_ids == ("a",) and a.is_finished and a.output_token_ids == [11, 12, 13, 14]
    out, _ = run_step(s, default=15)
    [resumed] = out.scheduled_cached_reqs
    assert resumed.replaces_block_table and len(resumed.new_page_ids) == 3
    assert resumed.num_computed_tokens == 0 and resumed.new_token_ids == (12,)
    assert out.num_scheduled_tokens == {"b": 5} and out.sampling_req_ids == ("b",)
    assert b.output_token_ids == [11, 12, 15]


def test_a_preempted_request_goes_back_to_the_front_of_the_waiting_queue():
    s = make_scheduler(num_pages=5, page_size=2, max_num_seqs=2)
    for rid, prompt in (("a", 3), ("b", 3), ("c", 1)):
        s.add_request(make_request(rid, prompt, max_tokens=4))
    run_step(s)
    run_step(s)
    out, _ = run_step(s)
    assert out.preempted_req_ids == {"b"}
    # b needs 3 pages and 1 is free: it blocks the queue; c, though small, does not jump it.
    out, _ = run_step(s)
    assert out.scheduled_req_ids == ("a",)
    out, _ = run_step(s)
    assert out.scheduled_req_ids == ("b", "c")


def test_a_request_with_no_one_after_it_preempts_itself():
    s = make_scheduler(num_pages=5, page_size=2)
    a = make_request("a", 4, max_tokens=2)
    b = make_request("b", 2, max_tokens=2)
    s.add_request(a)
    s.add_request(b)
    run_step(s)  # a: pages 1, 2; b: page 3; one page left
    out, _ = run_step(s)  # a takes the last page for position 4; b has no one to preempt but itself
    assert out.scheduled_req_ids == ("a",) and out.preempted_req_ids == {"b"}
    assert b.status is RequestStatus.PREEMPTED and a.is_finished
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"b": 3} and out.finished_req_ids == {"a"}


@pytest.mark.parametrize("policy, victim", [("fcfs", "c"), ("priority", "b")])
def test_preemption_victim_is_the_largest_priority_then_arrival(policy, victim):
    s = make_scheduler(num_pages=5, page_size=2, policy=policy)
    for rid, priority in (("a", 0), ("b", 2), ("c", 1)):
        s.add_request(make_request(rid, 2, priority=priority, max_tokens=3))
    run_step(s)  # three full pages; each needs a new one for its first decode
    out, _ = run_step(s)
    assert out.preempted_req_ids == {victim}
    assert set(out.scheduled_req_ids) == {"a", "b", "c"} - {victim}
    if policy == "priority":
        assert out.scheduled_req_ids == ("a", "c")  # served in priority order


def test_watermark_holds_back_admissions():
    s = make_scheduler(num_pages=6, page_size=4, watermark=2)  # 5 allocatable, 3 admissible
    s.add_request(make_request("a", 12, max_tokens=1))
    s.add_request(make_request("b", 4, max_tokens=1))
    out, _ = run_step(s)
    assert out.scheduled_req_ids == ("a",)  # b would leave 1 free page < 2
    out, _ = run_step(s)
    assert out.scheduled_req_ids == ("b",)


def test_add_request_rejects_what_can_never_run_and_changes_nothing():
    s = make_scheduler(num_pages=5, page_size=4, max_model_len=12)  # 16 tokens of KV
    s.add_request(make_request("a", 4))
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        s.add_request(make_request("long", 13))
    with pytest.raises(ValueError, match="already in the scheduler"):
        s.add_request(make_request("a", 4))
    with pytest.raises(ValueError, match="same prompt"):
        s.add_request(make_request("s", [1, 2]), fork_from="a")
    with pytest.raises(ValueError, match="not an unfinished request"):
        s.add_request(make_request("s", 4), fork_from="nobody")
    done = make_request("done", 4)
    done.status = RequestStatus.RUNNING
    with pytest.raises(ValueError, match="not fresh"):
        s.add_request(done)
    with pytest.raises(TypeError):
        s.add_request("a")
    assert (s.num_waiting, s.num_running) == (1, 0)
    # 17 tokens of KV would be needed at most: more than the 4 pages of 4 tokens.
    tight = make_scheduler(num_pages=5, page_size=4, max_model_len=40, watermark=1)
    tight.add_request(make_request("ok", 4, max_tokens=9))  # up to 12 tokens of KV: 3 pages
    with pytest.raises(ValueError, match="KV pool admits at most 3 pages"):
        tight.add_request(make_request("big", 4, max_tokens=10))
    with pytest.raises(ValueError, match="KV pool"):
        tight.add_request(make_request("unbounded", 4, max_tokens=None))
    assert tight.num_waiting == 1


def test_abort_in_each_state_frees_pages_at_once():
    s = make_scheduler(num_pages=5, page_size=2)
    bm = s.block_manager
    waiting = make_request("w", 3, max_tokens=4)
    s.add_request(waiting)
    assert s.abort_requests(["w"]) == [waiting]
    assert waiting.status is RequestStatus.FINISHED_ABORTED and waiting.finish_reason == "abort"
    assert not s.has_unfinished_requests()
    assert run_step(s)[0].finished_req_ids == frozenset()  # the runner never saw it

    a, b = make_request("a", 3, max_tokens=4), make_request("b", 3, max_tokens=4)
    s.add_request(a)
    s.add_request(b)
    run_step(s)
    run_step(s)
    out, _ = run_step(s)
    assert out.preempted_req_ids == {"b"}
    assert s.abort_requests("b") == [b]  # preempted: holds no pages, the runner knows it
    assert s.abort_requests(["a", "a", "nobody", "b"]) == [a]  # running
    assert bm.num_free_pages == 4 and bm.usage == 0.0
    out, _ = run_step(s)
    assert out.finished_req_ids == {"a", "b"} and out.is_empty
    assert s.abort_requests(["a"]) == []


def test_abort_between_schedule_and_update_drops_the_sampled_token():
    s = make_scheduler()
    a, b = make_request("a", 3), make_request("b", 3)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    s.abort_requests(["a"])
    changed = s.update_from_output(out, {"a": [5], "b": [6]})
    assert changed == [b] and a.output_token_ids == [] and b.output_token_ids == [6]
    assert s.block_manager.num_request_pages("b") == 1 and not s.block_manager.has_request("a")


def test_siblings_fork_the_leaders_prompt_pages_with_copy_on_write():
    s = make_scheduler(page_size=4)
    bm = s.block_manager
    leader = make_request("l", 6)
    s.add_request(leader)
    s.add_request(make_request("s1", 6), fork_from="l")
    s.add_request(make_request("s2", 6), fork_from="l")
    out, _ = run_step(s)
    assert out.scheduled_req_ids == ("l",) and s.num_waiting == 2  # siblings wait for the prompt
    out, _ = run_step(s)
    assert out.scheduled_req_ids == ("l", "s1", "s2")
    assert out.num_scheduled_tokens == {"l": 1, "s1": 1, "s2": 1}
    assert out.copy_ops == ((2, 3), (2, 4))  # the shared last prompt page, once per sibling
    assert [(r.block_table, r.num_computed_tokens) for r in out.scheduled_new_reqs] == [((1, 3), 5), ((1, 4), 5)]
    assert out.sampling_req_ids == ("l", "s1", "s2") and out.logits_token_indices == (0, 1, 2)
    assert bm.ref_count(1) == 3 and bm.ref_count(2) == 1
    assert bm.num_free_pages == 63 - 4


def test_a_write_into_a_page_shared_after_admission_copies_it_and_resends_the_table():
    s = make_scheduler(page_size=4)
    s.add_request(make_request("a", 6))
    run_step(s)
    s.block_manager.fork("a", "holder")  # another holder of a's pages, e.g. a future beam
    out, _ = run_step(s)
    assert out.copy_ops == ((2, 3),)
    [cached] = out.scheduled_cached_reqs
    assert cached.replaces_block_table and cached.new_page_ids == (1, 3)
    out, _ = run_step(s)
    assert not out.scheduled_cached_reqs[0].replaces_block_table and out.copy_ops == ()


def test_a_sibling_whose_leader_ends_early_computes_its_prompt_alone():
    s = make_scheduler(budget=4)
    s.add_request(make_request("l", 6))
    s.add_request(make_request("s", 6), fork_from="l")
    run_step(s)  # l: 4 of 6 prompt tokens
    s.abort_requests(["l"])
    out, _ = run_step(s)
    [new] = out.scheduled_new_reqs
    assert (new.request_id, new.num_computed_tokens, out.num_scheduled_tokens["s"]) == ("s", 0, 4)
    assert out.copy_ops == ()


def test_prefix_cache_hits_skip_computed_pages():
    s = make_scheduler(page_size=4, budget=7, prefix_caching=True)
    bm = s.block_manager
    a = make_request("a", list(range(1, 11)), max_tokens=1)
    s.add_request(a)
    run_step(s)
    # Only pages whose every token has KV are published: 7 tokens fill one page.
    assert bm.get_computed_pages(a.block_hashes, a.num_tokens).pages == (1,)
    run_step(s)
    assert a.is_finished
    b = make_request("b", list(range(1, 10)) + [99], max_tokens=1)
    s.add_request(b)
    out, _ = run_step(s)
    [new] = out.scheduled_new_reqs
    assert new.num_computed_tokens == 8 and new.block_table[:2] == (1, 2)
    assert out.num_scheduled_tokens == {"b": 2}
    # One lookup per admission: a found nothing, b found 8 of its 10 tokens.
    assert s.prefix_cache_hit_rate == pytest.approx(8 / 20)


@pytest.mark.parametrize("kwargs, tokens, outputs, reason", [
    (dict(eos_token_ids=[9]), [5, 9, 1], [5, 9], "stop"),
    (dict(eos_token_ids=[9], ignore_eos=True, max_tokens=3), [9, 9, 9, 9], [9, 9, 9], "length"),
    (dict(eos_token_ids=[9], ignore_eos=True, stop_token_ids=[4]), [9, 4, 1], [9, 4], "stop"),
    (dict(eos_token_ids=[9], stop_token_ids=[4], min_tokens=2), [9, 4, 9, 1], [9, 4, 9], "stop"),
    (dict(min_tokens=2, max_tokens=2, eos_token_ids=[9]), [9, 9, 9], [9, 9], "length"),
    (dict(max_tokens=2, eos_token_ids=[9]), [1, 9, 1], [1, 9], "stop"),  # stop wins over length
    (dict(max_tokens=None), [1] * 10, [1, 1, 1, 1], "length"),  # max_model_len = 8, prompt 4
])
def test_stop_conditions(kwargs, tokens, outputs, reason):
    s = make_scheduler(max_model_len=8)
    r = make_request("r", 4, **kwargs)
    s.add_request(r)
    for token in tokens:
        run_step(s, default=token)
        if r.is_finished:
            break
    assert r.output_token_ids == outputs and r.finish_reason == reason
    assert not s.block_manager.has_request("r") and not s.has_unfinished_requests()


def test_a_prompt_of_max_model_len_yields_one_token():
    s = make_scheduler(max_model_len=8)
    r = make_request("r", 8, max_tokens=None)
    s.add_request(r)
    run_step(s)
    assert r.output_token_ids == [7] and r.finish_reason == "length"


def test_finish_requests_from_outside():
    s = make_scheduler()
    r = make_request("r", 3)
    s.add_request(r)
    run_step(s)
    with pytest.raises(ValueError, match="reason must be one of"):
        s.finish_requests(["r"], "done")
    assert s.finish_requests(["r"], "stop") == [r]
    assert r.status is RequestStatus.FINISHED_STOPPED and s.block_manager.num_free_pages == 63
    assert run_step(s)[0].finished_req_ids == {"r"}


def test_update_from_output_checks_what_it_is_given():
    s = make_scheduler(budget=4)
    s.add_request(make_request("a", 6))
    s.add_request(make_request("b", 2))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 4}
    with pytest.raises(RuntimeError, match="update_from_output"):
        s.schedule()
    with pytest.raises(ValueError, match="did not sample"):
        s.update_from_output(out, {"a": [1]})
    s.update_from_output(out, {})
    out = s.schedule()
    with pytest.raises(ValueError, match="no sampled token"):
        s.update_from_output(out, {"a": [1]})
    s.update_from_output(out, {"a": [1], "b": [2]})
    with pytest.raises(ValueError, match="already applied"):
        s.update_from_output(out, {"a": [1], "b": [2]})


def test_counters_and_kv_usage():
    s = make_scheduler(num_pages=11, page_size=2, max_num_seqs=1)
    s.add_request(make_request("a", 3))
    s.add_request(make_request("b", 3))
    run_step(s)
    assert (s.num_running, s.num_waiting, s.kv_usage) == (1, 1, pytest.approx(0.2))
    assert s.get_request("a").num_output_tokens == 1 and s.get_request("zzz") is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=-1), "max_num_batched_tokens"),
    (dict(policy="lifo"), "policy"),
    (dict(long_prefill_token_threshold=-1), "long_prefill_token_threshold"),
    (dict(page_size=True), "page_size"),
])
def test_scheduler_config_is_validated(kwargs, match):
    base = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32, page_size=4)
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**{**base, **kwargs})
    config = SchedulerConfig(**base)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_num_seqs = 3
    with pytest.raises(ValueError, match="page_size"):
        Scheduler(config, BlockManager(8, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(request_id=""), "request_id"),
    (dict(prompt_token_ids=[]), "empty"),
    (dict(prompt_token_ids=[1, -2]), "non-negative"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=5, max_tokens=4), "exceeds max_tokens"),
    (dict(eos_token_ids=["x"]), "eos_token_ids"),
    (dict(priority=0.5), "priority"),
])
def test_request_is_validated(kwargs, match):
    base = dict(request_id="r", prompt_token_ids=[1, 2])
    with pytest.raises(ValueError, match=match):
        Request(**{**base, **kwargs})


# ----- simulation ----------------------------------------------------------------------------

def simulate(seed: int, policy: str, prefix_caching: bool, num_host_pages: int = 0):
    """Random arrivals, n > 1 groups and aborts on a tiny pool; returns run statistics."""
    rng = random.Random(seed)
    page_size, num_pages, max_model_len = 4, 14, 40
    model = FakeModel(vocab_size=24)
    bm = BlockManager(num_pages, page_size, enable_prefix_caching=prefix_caching, watermark_pages=1,
                      num_host_pages=num_host_pages)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=12, max_model_len=max_model_len,
                             page_size=page_size, policy=policy, long_prefill_token_threshold=rng.choice([0, 5]))
    scheduler = Scheduler(config, bm)
    runner = FakeRunner(model, num_pages, page_size)
    shared_prefixes = [[rng.randrange(24) for _ in range(10)] for _ in range(2)]

    arrivals = collections.defaultdict(list)  # step -> [(request, fork_from)]
    aborts = collections.defaultdict(list)  # step -> [request id]
    requests = {}
    for i in range(24):
        prompt = rng.choice(shared_prefixes)[:rng.randint(0, 10)] + [rng.randrange(24) for _ in range(rng.randint(1, 10))]
        max_tokens = rng.choice([None, rng.randint(1, 24)])
        kwargs = dict(max_tokens=max_tokens, min_tokens=rng.randint(0, min(3, max_tokens or 3)),
                      eos_token_ids=[rng.randrange(24)], stop_token_ids=rng.sample(range(24), rng.randint(0, 1)),
                      ignore_eos=rng.random() < 0.2, priority=rng.randint(0, 2))
        step = rng.randint(0, 40)
        group = [f"r{i}"] + [f"r{i}.{k}" for k in range(rng.choice([0, 0, 0, 1, 2]))]
        for rid in group:
            requests[rid] = Request(rid, prompt, arrival_time=step, **kwargs)
            runner.seeds[rid] = rng.randrange(1 << 30)
            arrivals[step].append((requests[rid], group[0] if rid != group[0] else None))
            if rng.random() < 0.1:
                aborts[rng.randint(step, step + 30)].append(rid)

    finished = collections.Counter()
    step = 0
    while step <= max(arrivals) or scheduler.has_unfinished_requests():
        for request, leader in arrivals[step]:
            scheduler.add_request(request, fork_from=leader if scheduler.get_request(leader or "") else None)
        finished.update(r.request_id for r in scheduler.abort_requests(aborts[step]))
        out = scheduler.schedule()
        assert out.total_num_scheduled_tokens <= config.max_num_batched_tokens
        assert scheduler.num_running <= config.max_num_seqs
        changed = scheduler.update_from_output(out, runner.execute(out))
        finished.update(r.request_id for r in changed if r.is_finished)
        step += 1
        assert step < 3000, "the simulation does not make progress"
    runner.execute(scheduler.schedule())  # tells the runner about the last finished requests

    assert finished == collections.Counter(requests.keys())  # each exactly once
    for rid, request in requests.items():
        expected, reason = generate_alone(model, request, runner.seeds[rid], max_model_len)
        if request.finish_reason == "abort":
            assert expected[:request.num_output_tokens] == request.output_token_ids, rid
        else:
            assert (request.output_token_ids, request.finish_reason) == (expected, reason), rid
    assert runner.batch == {}
    assert bm.num_free_pages == num_pages - 1 and list(bm.request_ids()) == []
    assert all(bm.ref_count(p) == 0 for p in range(num_pages))
    return scheduler, runner


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_simulation_matches_each_request_run_alone(seed, policy, prefix_caching):
    scheduler, runner = simulate(seed, policy, prefix_caching)
    # The pool is small enough that the run must preempt, and n > 1 groups must fork.
    assert scheduler.num_preemptions_total > 0
    assert runner.num_copies > 0
    if prefix_caching:
        assert scheduler.prefix_cache_hit_rate > 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_simulation_through_the_host_tier_matches_each_request_run_alone(seed):
    """Pages evicted from the 13-page pool go to 6 host slots and come back for later hits; every
    request still produces what it produces alone (a stale or misplaced reload would not)."""
    scheduler, runner = simulate(seed, "fcfs", True, num_host_pages=6)
    assert runner.num_offloads > 0 and runner.num_reloads > 0
    assert scheduler.block_manager.num_external_hit_tokens == runner.num_reloads * 4


def test_output_view_reads_as_the_output_list_without_copying():
    from jaxinfer.engine.request import TokenTail

    tokens = [7, 8, 9, 1, 2]
    view = TokenTail(tokens, 3)
    assert len(view) == 2 and list(view) == [1, 2] and view[0] == 1 and view[-1] == 2
    assert view[0:5] == [1, 2] and view[-1:] == [2]
    tokens.append(3)  # live: later tokens show
    assert len(view) == 3 and view[-1] == 3 and list(view) == tokens[3:]
    for bad in (3, -4):
        with pytest.raises(IndexError):
            view[bad]
    empty = TokenTail([4, 5], 2)
    assert len(empty) == 0 and list(empty) == [] and empty[:] == []
