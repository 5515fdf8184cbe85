"""Continuous-batching scheduler (vLLM v1 style): one token budget per step, no phases.

Each request has `num_tokens` known tokens (prompt plus outputs) and `num_computed_tokens` of
them with KV in the cache. A step lets requests catch up under `max_num_batched_tokens`: running
requests first, in order (a decode takes 1 token, an unfinished prefill its next chunk), then
waiting requests are admitted while `max_num_seqs` and the budget allow, the last one possibly
with a partial chunk. Only tokens still to compute are charged to the budget: a prefix hit's
(device or host tier) cost nothing. Admission stops at the first waiting request that cannot get
pages, so a later one whose prefix is cached never overtakes it (nor is blocked by more than
the requests ahead of it). A request "samples" in a step when its scheduled tokens reach its last
known token. Running requests are served in order of (priority, arrival) under "priority" and
of arrival under "fcfs". When one cannot get pages, the last in that order is preempted by
recompute: its pages are freed, its computed count reset, its output tokens kept, and it returns
to the front of the waiting queue (under "priority": to its (priority, arrival) place); it may be
the request itself. No request is admitted in a step that preempted.

Runner contract. `schedule()` returns a `SchedulerOutput`, a diff against what the runner has
been told so far; the runner keeps a persistent batch (per request: token ids, block table) and
applies, in this order:
  1. `finished_req_ids`: forget these requests (ids it never saw are never listed).
  2. `preempted_req_ids`: drop them from the batch but keep their token ids; their pages are
     gone. They come back later as cached requests with `replaces_block_table=True`.
  3. `scheduled_new_reqs`: first sight of a request: all its known token ids, its block table
     and its computed count.
  4. `scheduled_cached_reqs`: `new_token_ids` are the tokens appended since the runner last saw
     the request (the sampled ones); `new_page_ids` are appended to its block table, or replace
     it whole when `replaces_block_table` (resumed after preemption, or copy-on-write swapped a
     page).
  5. `offload_ops` (device page -> host slot), then `reload_ops` (host slot -> device page): the
     host KV tier's copies (block_manager.py), before anything else touches those pages.
  6. `copy_ops`: copy every layer's k and v page `src` to `dst`, in order, BEFORE the step writes
     any KV.
Steps with no tokens still carry their transfers, which the runner applies all the same.
Then it runs one forward pass over `total_num_scheduled_tokens` tokens laid out request by
request in `scheduled_req_ids` order: request r contributes positions
[num_computed_tokens, num_computed_tokens + num_scheduled_tokens[r]), where num_computed_tokens is
the value in its new/cached entry; the KV of position p goes to slot
`block_table[p // page_size] * page_size + p % page_size`. Logits are needed only at
`logits_token_indices` (flat indices into the step's tokens); row i of those logits belongs to
`sampling_req_ids[i]`. The engine passes the sampled token ids to `update_from_output` before
the next `schedule()`.

Speculative decoding. A decoding request whose `spec_token_ids` the engine set before
`schedule()` computes its last known token and those proposed tokens in the step
(`spec_token_ids[r]` in the output; they are not part of its known tokens, so the runner
appends them to the step's tokens itself). Its logits index points at the last known token;
the next k rows are the proposals'. `update_from_output` then takes 1 to k + 1 tokens for it
(the accepted proposals and one more), and the KV of rejected proposals is rolled back before
any page is published to the prefix cache.

Host Python only: this module must not import jax.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from typing import Iterable, Mapping

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.request import FINISHED_STATUS_BY_REASON, Request, RequestStatus

POLICIES = ("fcfs", "priority")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step.

    Attributes:
      max_num_seqs: most requests running (holding KV pages) at once.
      max_num_batched_tokens: token budget of one step.
      max_model_len: longest sequence (prompt plus outputs) a request may reach.
      page_size: tokens per KV page (must match the block manager's).
      policy: "fcfs" (arrival order) or "priority" (lower `priority` first, then arrival).
      long_prefill_token_threshold: if > 0, most tokens one request takes in a step, so long
        prompts do not starve decodes.
      max_steps_in_flight: scheduled steps whose sampled tokens may be outstanding. 1: each
        `schedule()` follows the previous step's `update_from_output`. 2 (asynchronous
        scheduling): the next step is planned while the previous one runs; a request that
        samples in a step gets a placeholder token whose position the next step computes (its
        id comes from the device), and the host learns the token one step late.
      max_num_spec_tokens: most proposed tokens verified in one step (speculative decoding).
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    page_size: int
    policy: str = "fcfs"
    long_prefill_token_threshold: int = 0
    max_steps_in_flight: int = 1
    max_num_spec_tokens: int = 0

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        threshold = self.long_prefill_token_threshold
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be a non-negative integer, got {threshold!r}")
        if self.max_steps_in_flight not in (1, 2):
            raise ValueError(f"max_steps_in_flight must be 1 or 2, got {self.max_steps_in_flight!r}")


@dataclasses.dataclass(frozen=True)
class NewRequestData:
    """A request the runner sees for the first time."""

    request_id: str
    token_ids: tuple[int, ...]  # every known token: prompt then outputs
    num_prompt_tokens: int
    block_table: tuple[int, ...]
    num_computed_tokens: int  # tokens with KV before this step (prefix hit, fork)


@dataclasses.dataclass(frozen=True)
class CachedRequestData:
    """What changed for a request the runner already holds."""

    request_id: str
    new_page_ids: tuple[int, ...]  # appended to the block table, or the whole table (see below)
    num_computed_tokens: int  # tokens with KV before this step
    new_token_ids: tuple[int, ...]  # tokens appended since the runner last saw the request
    replaces_block_table: bool = False  # new_page_ids is the full table (resumed, or copy-on-write)


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """One step's work; see the module docstring for how the runner applies it."""

    scheduled_new_reqs: tuple[NewRequestData, ...]
    scheduled_cached_reqs: tuple[CachedRequestData, ...]
    scheduled_req_ids: tuple[str, ...]  # the order of requests' tokens in the step
    num_scheduled_tokens: Mapping[str, int]
    total_num_scheduled_tokens: int
    sampling_req_ids: tuple[str, ...]
    logits_token_indices: tuple[int, ...]  # per sampling request, its last token's flat index
    finished_req_ids: frozenset[str]
    preempted_req_ids: frozenset[str]
    copy_ops: tuple[tuple[int, int], ...]
    offload_ops: tuple[tuple[int, int], ...] = ()  # (device page, host slot)
    reload_ops: tuple[tuple[int, int], ...] = ()  # (host slot, device page)
    # Proposed tokens verified in this step, per sampling request that has any.
    spec_token_ids: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        described = [r.request_id for r in self.scheduled_new_reqs] + [r.request_id for r in self.scheduled_cached_reqs]
        if sorted(described) != sorted(self.scheduled_req_ids) or len(set(described)) != len(described):
            raise ValueError("scheduled_req_ids must list each new and cached request exactly once")
        if list(self.num_scheduled_tokens) != list(self.scheduled_req_ids):
            raise ValueError("num_scheduled_tokens must have one entry per scheduled request, in step order")
        if any(n <= 0 for n in self.num_scheduled_tokens.values()):
            raise ValueError(f"every scheduled request needs >= 1 token: {dict(self.num_scheduled_tokens)}")
        if sum(self.num_scheduled_tokens.values()) != self.total_num_scheduled_tokens:
            raise ValueError("total_num_scheduled_tokens is not the sum of num_scheduled_tokens")
        if len(self.sampling_req_ids) != len(self.logits_token_indices):
            raise ValueError("sampling_req_ids and logits_token_indices must pair up")
        if not set(self.sampling_req_ids) <= set(self.scheduled_req_ids):
            raise ValueError("a sampling request is not scheduled")
        if self.preempted_req_ids & set(self.scheduled_req_ids):
            raise ValueError("a preempted request cannot be scheduled in the same step")
        if not set(self.spec_token_ids) <= set(self.sampling_req_ids):
            raise ValueError("a request with proposed tokens must sample in the step")

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


class _RunnerView:
    """What the runner has been told about one request, to send only diffs."""

    __slots__ = ("num_pages", "num_tokens", "replace_table")

    def __init__(self):
        self.num_pages = 0
        self.num_tokens = 0
        self.replace_table = False


class Scheduler:
    """Decides, step by step, which tokens of which requests to compute.

    Args:
      config: step limits and policy.
      block_manager: the KV page allocator (its page size must match the config's).
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        if config.page_size != block_manager.page_size:
            raise ValueError(f"config.page_size ({config.page_size}) differs from the block manager's "
                             f"({block_manager.page_size})")
        self.config = config
        self.block_manager = block_manager
        self._requests: dict[str, Request] = {}  # unfinished requests
        self._waiting: list[Request] = []  # admission order
        self._running: list[Request] = []  # service order: sorted by _order_key
        self._order_keys: dict[str, tuple] = {}
        self._arrival_counter = itertools.count()
        self._fork_from: dict[str, str] = {}  # sibling -> leader whose prompt pages it will share
        self._runner_views: dict[str, _RunnerView] = {}
        self._finished_unreported: list[str] = []
        self._awaiting_update: list[SchedulerOutput] = []  # scheduled, not yet updated, in order
        self.num_preemptions_total = 0

    # ----- counters -----------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Waiting and preempted requests."""
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        return self.block_manager.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.block_manager.prefix_hit_rate

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def running_requests(self) -> list[Request]:
        """The running requests in service order (a copy)."""
        return list(self._running)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    # ----- requests in and out --------------------------------------------------------------------

    def add_request(self, request: Request, fork_from: str | None = None) -> None:
        """Queues a new request.

        Args:
          request: a fresh request (WAITING, nothing computed, no outputs).
          fork_from: for n > 1, the id of an unfinished request with the same prompt; this one
            waits until that leader has computed its prompt, then shares its prompt pages and
            recomputes only the last prompt token.
        Raises:
          ValueError, changing nothing, for a duplicate id, a prompt longer than max_model_len,
          a request whose longest possible sequence cannot fit the KV pool, or a bad fork_from.
        """
        if not isinstance(request, Request):
            raise TypeError(f"expected a Request, got {type(request).__name__}")
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request {rid!r} is already in the scheduler")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens or request.num_output_tokens:
            raise ValueError(f"request {rid!r} is not fresh: {request!r}")
        if request.num_prompt_tokens > self.config.max_model_len:
            raise ValueError(f"request {rid!r}: prompt of {request.num_prompt_tokens} tokens exceeds "
                             f"max_model_len={self.config.max_model_len}")
        bm = self.block_manager
        max_kv_tokens = self._max_kv_tokens(request)
        if bm.pages_for(max_kv_tokens) > bm.num_allocatable_pages - bm.watermark_pages:
            raise ValueError(
                f"request {rid!r} may reach {max_kv_tokens} tokens of KV, {bm.pages_for(max_kv_tokens)} pages, but "
                f"the KV pool admits at most {bm.num_allocatable_pages - bm.watermark_pages} pages; lower "
                f"max_tokens or the prompt length")
        if fork_from is not None:
            leader = self._requests.get(fork_from)
            if leader is None:
                raise ValueError(f"fork_from={fork_from!r} is not an unfinished request")
            if leader.prompt_token_ids != request.prompt_token_ids:
                raise ValueError(f"request {rid!r} must have the same prompt as {fork_from!r} to share its pages")
        self._requests[rid] = request
        self._hash_new_pages(request)
        arrival = (request.arrival_time, next(self._arrival_counter))
        self._order_keys[rid] = (request.priority, *arrival) if self.config.policy == "priority" else arrival
        if fork_from is not None:
            self._fork_from[rid] = fork_from
        self._enqueue_waiting(request, front=False)

    def _hash_new_pages(self, request: Request) -> None:
        if self.block_manager.enable_prefix_caching:
            self.block_manager.extend_block_hashes(request.block_hashes, request.all_token_ids, request.cache_salt)

    def _max_kv_tokens(self, request: Request) -> int:
        # The last sampled token never gets KV, so a sequence that stops at length L needs L - 1.
        max_len = self.config.max_model_len
        if request.max_tokens is not None:
            max_len = min(max_len, request.num_prompt_tokens + request.max_tokens)
        return max(request.num_prompt_tokens, max_len - 1)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Aborts requests in any unfinished state, freeing their pages now; other ids are ignored."""
        return self.finish_requests(request_ids, "abort")

    def finish_requests(self, request_ids: Iterable[str], reason: str) -> list[Request]:
        """Finishes requests from outside (e.g. a stop string matched) with reason "stop",
        "length" or "abort". Unknown or already finished ids are ignored. Returns the requests
        finished by this call."""
        status = FINISHED_STATUS_BY_REASON.get(reason)
        if status is None:
            raise ValueError(f"reason must be one of {sorted(FINISHED_STATUS_BY_REASON)}, got {reason!r}")
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        finished = []
        for rid in request_ids:
            request = self._requests.get(rid)
            if request is not None:
                self._finish(request, status)
                finished.append(request)
        return finished

    def _finish(self, request: Request, status: RequestStatus) -> None:
        rid = request.request_id
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self.block_manager.free(rid)
        del self._requests[rid]
        del self._order_keys[rid]
        self._fork_from.pop(rid, None)
        request.status = status
        if self._runner_views.pop(rid, None) is not None:
            self._finished_unreported.append(rid)

    def _enqueue_waiting(self, request: Request, front: bool) -> None:
        if self.config.policy == "priority":
            bisect.insort(self._waiting, request, key=lambda r: self._order_keys[r.request_id])
        elif front:
            self._waiting.insert(0, request)
        else:
            self._waiting.append(request)

    # ----- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plans the next step. With max_steps_in_flight = 1, call `update_from_output` with its
        result before scheduling again; with 2, one earlier step may still be outstanding."""
        if len(self._awaiting_update) >= self.config.max_steps_in_flight:
            raise RuntimeError("update_from_output must be called with the previous output before schedule()")
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        copy_ops: list[tuple[int, int]] = []
        preempted: list[str] = []
        drafts: dict[str, tuple[int, ...]] = {}

        i = 0
        while i < len(self._running) and budget > 0:
            request = self._running[i]
            uncomputed = request.num_tokens_with_placeholders - request.num_computed_tokens
            proposed, request.spec_token_ids = request.spec_token_ids, []
            # <= 0: a step verifying its proposals is in flight (its outcome is unknown), or
            # its last token is in flight and it is the last one it may have.
            if uncomputed <= 0 or not request.may_generate_more(self.config.max_model_len):
                i += 1
                continue
            num_new = self._num_new_tokens(uncomputed, budget)
            if proposed and uncomputed == 1 and not request.num_output_placeholders:
                drafts[request.request_id] = tuple(proposed)
            ops = self._reserve_pages(request, num_new)
            while ops is None:
                victim = self._running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
                ops = self._reserve_pages(request, num_new)
            if ops is None:
                break  # the request preempted itself; it was the last one running
            copy_ops.extend(ops)
            scheduled.append((request, num_new))
            budget -= num_new
            i += 1

        # Admitting right after a preemption would only thrash: pages were just found short.
        for rid in preempted:
            drafts.pop(rid, None)
        if drafts:
            # Proposals come after every running request's own tokens; while requests wait to
            # be admitted they take at most half of what is left, so neither verification nor
            # admission starves the other.
            admitting = not preempted and self._waiting and len(self._running) < self.config.max_num_seqs
            drafts = self._schedule_proposals(scheduled, drafts, budget // 2 if admitting else budget, copy_ops)
            budget -= sum(map(len, drafts.values()))
        if not preempted:
            self._admit_waiting(budget, scheduled, copy_ops)
        return self._build_output(scheduled, copy_ops, preempted, drafts)

    def _schedule_proposals(self, scheduled: list, drafts: dict, budget: int, copy_ops: list) -> dict:
        """Adds proposed tokens to their requests' steps from `budget` (what the running
        requests' own tokens left, or part of it), in service order, as far as pages allow
        without preempting anyone. Returns the proposals scheduled."""
        taken = {}
        budget = min(budget, self.config.max_num_spec_tokens)
        for j, (request, num_new) in enumerate(scheduled):
            proposed = drafts.get(request.request_id)
            if not proposed or budget <= 0:
                continue
            proposed = proposed[:budget]
            ops = self._reserve_pages(request, num_new + len(proposed))
            if ops is None:
                continue
            copy_ops.extend(ops)
            scheduled[j] = (request, num_new + len(proposed))
            taken[request.request_id] = proposed
            budget -= len(proposed)
        return taken

    def _num_new_tokens(self, num_uncomputed: int, budget: int) -> int:
        threshold = self.config.long_prefill_token_threshold
        if threshold:
            num_uncomputed = min(num_uncomputed, threshold)
        return min(num_uncomputed, budget)

    def _reserve_pages(self, request: Request, num_new: int) -> list[tuple[int, int]] | None:
        """Pages for the request's next `num_new` tokens, made writable; copy ops or None."""
        start = request.num_computed_tokens
        end = start + num_new
        if self.block_manager.allocate_slots(request.request_id, end) is None:
            return None
        ops = self.block_manager.prepare_write(request.request_id, start, end)
        if ops:
            self._mark_table_replaced(request.request_id)
        return ops

    def _mark_table_replaced(self, request_id: str) -> None:
        view = self._runner_views.get(request_id)
        if view is not None:
            view.replace_table = True

    def _preempt(self, request: Request) -> None:
        self._running.remove(request)
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self._mark_table_replaced(request.request_id)
        self._enqueue_waiting(request, front=True)

    def _admit_waiting(self, budget: int, scheduled: list, copy_ops: list) -> int:
        i = 0
        while i < len(self._waiting) and budget > 0 and len(self._running) < self.config.max_num_seqs:
            request = self._waiting[i]
            rid = request.request_id
            if request.num_output_placeholders:
                i += 1  # preempted with a token in flight: it resumes once the token is known
                continue
            leader_id = self._fork_from.get(rid)
            leader = self._requests.get(leader_id) if leader_id is not None else None
            if leader_id is not None and leader is None:
                del self._fork_from[rid]  # the leader ended first: this one computes its prompt alone
            if leader is not None:
                if leader.status is not RequestStatus.RUNNING or leader.num_computed_tokens < leader.num_prompt_tokens:
                    i += 1  # the leader's prompt KV is not there yet; later requests may go first
                    continue
                ops = self._fork_sibling(request, leader)
                if ops is None:
                    break
                del self._fork_from[rid]
                copy_ops.extend(ops)
                num_new = 1
            else:
                num_new = self._allocate_admission(request, budget)
                if num_new is None:
                    break
            del self._waiting[i]
            request.status = RequestStatus.RUNNING
            bisect.insort(self._running, request, key=lambda r: self._order_keys[r.request_id])
            scheduled.append((request, num_new))
            budget -= num_new
        return budget

    def _allocate_admission(self, request: Request, budget: int) -> int | None:
        """Pages for a waiting request's first chunk after any prefix hit; its size, or None.

        The budget is spent on tokens still to compute only: a hit's tokens (device or host
        tier) cost none. The lookup reads the request's kept hashes, and is counted only when
        the admission succeeds, so a request waiting for pages is neither re-hashed nor
        counted again on each retry."""
        bm = self.block_manager
        hit = bm.get_computed_pages(request.block_hashes, request.num_tokens) if request.use_prefix_cache else None
        num_cached = hit.num_tokens if hit is not None else 0
        num_new = self._num_new_tokens(request.num_tokens - num_cached, budget)
        if bm.allocate_slots(request.request_id, num_cached + num_new, prefix_hit=hit) is None:
            return None
        if hit is not None and bm.enable_prefix_caching:
            bm.record_admission(request.num_tokens, hit)
        request.num_computed_tokens = num_cached
        return num_new

    def _fork_sibling(self, request: Request, leader: Request) -> list[tuple[int, int]] | None:
        """Shares the leader's prompt pages; the sibling recomputes the last prompt token."""
        bm = self.block_manager
        num_prompt = request.num_prompt_tokens
        # The last prompt page is shared, so writing it costs one copy: an admission page.
        if bm.num_admissible_pages < 1:
            return None
        bm.fork(leader.request_id, request.request_id, num_tokens=num_prompt)
        ops = bm.prepare_write(request.request_id, num_prompt - 1, num_prompt)
        if ops is None:
            bm.free(request.request_id)
            return None
        request.num_computed_tokens = num_prompt - 1
        return ops

    def _build_output(self, scheduled, copy_ops, preempted, drafts) -> SchedulerOutput:
        bm = self.block_manager
        new_reqs, cached_reqs = [], []
        num_scheduled: dict[str, int] = {}
        sampling, logits_indices = [], []
        offset = 0
        for request, num_new in scheduled:
            rid = request.request_id
            view = self._runner_views.get(rid)
            if view is None:
                view = self._runner_views[rid] = _RunnerView()
                new_reqs.append(NewRequestData(
                    rid, tuple(request.all_token_ids), request.num_prompt_tokens,
                    tuple(bm.block_table(rid)), request.num_computed_tokens))
            else:
                start = 0 if view.replace_table else view.num_pages
                cached_reqs.append(CachedRequestData(
                    rid, tuple(bm.block_table(rid, start)), request.num_computed_tokens,
                    tuple(request.all_token_ids[view.num_tokens:]), view.replace_table))
            view.num_pages = bm.num_request_pages(rid)
            view.num_tokens = request.num_tokens
            view.replace_table = False
            num_scheduled[rid] = num_new
            offset += num_new
            num_drafts = len(drafts.get(rid, ()))
            if request.num_computed_tokens + num_new - num_drafts == request.num_tokens_with_placeholders:
                sampling.append(rid)
                logits_indices.append(offset - 1 - num_drafts)
        # The KV of these tokens is as good as computed once the runner takes this output.
        for request, num_new in scheduled:
            request.num_computed_tokens += num_new
        if self.config.max_steps_in_flight > 1:
            for rid in sampling:
                self._requests[rid].num_output_placeholders += 1
        finished, self._finished_unreported = self._finished_unreported, []
        offload_ops, reload_ops = bm.take_transfer_ops()
        output = SchedulerOutput(
            scheduled_new_reqs=tuple(new_reqs),
            scheduled_cached_reqs=tuple(cached_reqs),
            scheduled_req_ids=tuple(num_scheduled),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=offset,
            sampling_req_ids=tuple(sampling),
            logits_token_indices=tuple(logits_indices),
            finished_req_ids=frozenset(finished),
            preempted_req_ids=frozenset(rid for rid in preempted if rid in self._runner_views),
            copy_ops=tuple(copy_ops),
            offload_ops=tuple(offload_ops),
            reload_ops=tuple(reload_ops),
            spec_token_ids=drafts,
        )
        if not output.is_empty:
            self._awaiting_update.append(output)
        return output

    # ----- after the step ------------------------------------------------------------------------

    def update_from_output(self, output: SchedulerOutput, sampled: Mapping[str, list[int]]) -> list[Request]:
        """Applies a step's sampled tokens.

        Args:
          output: the oldest `schedule()` result not yet applied.
          sampled: request id -> tokens sampled for it (one per step without speculation), for
            each request in `output.sampling_req_ids` still running; ids of requests finished
            or aborted since the step was scheduled are ignored. A list is cut in place to the
            tokens taken: those after a stop among one step's accepted proposals are dropped.
        Returns:
          The requests that received tokens, including those that finished (pages freed).
        """
        if output.is_empty:
            if sampled:
                raise ValueError("an empty step samples nothing")
            return []
        if not self._awaiting_update or output is not self._awaiting_update[0]:
            raise ValueError("output is not the oldest outstanding schedule() result, or was already applied")
        sampling = set(output.sampling_req_ids)
        for rid, tokens in sampled.items():
            if rid not in sampling:
                raise ValueError(f"request {rid!r} did not sample in this step")
            if len(tokens) > 1 + len(output.spec_token_ids.get(rid, ())):
                raise ValueError(f"request {rid!r}: {len(tokens)} tokens from a step that verified "
                                 f"{len(output.spec_token_ids.get(rid, ()))} proposals")
        for rid in output.sampling_req_ids:
            request = self._requests.get(rid)
            if request is not None and request.status is RequestStatus.RUNNING and not sampled.get(rid):
                raise ValueError(f"no sampled token for request {rid!r}")
        self._awaiting_update.pop(0)
        in_flight = self.config.max_steps_in_flight > 1

        changed = []
        for rid in output.scheduled_req_ids:
            request = self._requests.get(rid)
            if request is None:
                continue
            if in_flight and rid in sampling:
                request.num_output_placeholders -= 1
            num_drafts = len(output.spec_token_ids.get(rid, ()))
            if num_drafts and request.status is RequestStatus.RUNNING:
                # Rejected proposals' KV is as good as never computed (and never published).
                num_rejected = num_drafts + 1 - len(sampled.get(rid) or (0,))
                request.num_computed_tokens -= num_rejected
            if request.status is RequestStatus.RUNNING:
                self.block_manager.cache_computed_pages(rid, request.block_hashes, request.num_computed_tokens)
            elif request.status is not RequestStatus.PREEMPTED:
                continue
            # (A request preempted after this step was planned still gets the step's token.)
            tokens = sampled.get(rid)
            if not tokens:
                continue
            for i, token in enumerate(tokens):
                request.append_output_token(token)
                status = request.stop_status(self.config.max_model_len)
                if status is not None:
                    self._finish(request, status)
                    del tokens[i + 1:]
                    break
            self._hash_new_pages(request)
            changed.append(request)
        return changed
