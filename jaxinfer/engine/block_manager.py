"""Paged KV-cache bookkeeping on the host: page allocation, ref counts, forks, prefix cache.

The device holds, per layer, k/v pages `[num_kv_heads, num_pages, page_size, head_dim]`; token
position p of a request lives in slot `block_table[p // page_size] * page_size + p % page_size`.
This module only decides which page ids each request owns; it never touches device memory.
Device work it asks for is returned as data: copy-on-write produces `(src_page, dst_page)` ops
the runner must apply before the step that writes the copies.

Page 0 is reserved and never handed out: the runner points padding tokens and unused block-table
entries at it.

Pages move between three states:
  * in use: ref count >= 1 (a page shared by forks or prefix hits has one ref per table);
  * free, uncached: ref count 0, contents meaningless;
  * free, cached (prefix caching only): ref count 0 but its hash still maps to it, so a later
    request with the same prefix can take it back. Cached free pages form an LRU list and are
    evicted (hash dropped) only when a page must be handed out and no uncached page is left.

Prefix caching hashes each FULL page as sha256(parent page's hash + the page's token ids), so a
hash names the whole prefix up to the end of that page. The chain starts from a namespace root:
the model's identity plus the request's `cache_salt`, so prompts that differ only in namespace
never share a page. Callers keep each request's hashes (`extend_block_hashes`, incrementally as
tokens arrive) and pass them in, so a request is hashed once however often it is looked up.
Pages are published to the cache only after their KV has been computed (`cache_computed_pages`,
called once a step has run); a hit is therefore always valid KV. A hit never covers a request's
last token: it must be computed to have logits to sample from.

With a host tier (`num_host_pages > 0`, see host_tier.py), a cached page that LRU eviction drops
from the device is copied to a host slot first, and a lookup that misses on the device continues
there: such pages get fresh device pages and are copied back. Both directions are returned as
data (`take_transfer_ops`), once per step, for the runner to apply in this order before any
other KV work of the step: offloads (device page -> host slot, read before anything overwrites
the page), then reloads (host slot -> device page).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from array import array
from typing import Iterator, Sequence

from jaxinfer.engine.host_tier import HostTier


def _chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    # A cryptographic hash: a collision here would silently serve another prompt's KV.
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def namespace_root(namespace: bytes, cache_salt: str | None) -> bytes:
    """The parent hash of a request's first page: the model's namespace and the request's salt."""
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise ValueError(f"cache_salt must be a non-empty string or None, got {cache_salt!r}")
    salt = b"" if cache_salt is None else b"salt\0" + cache_salt.encode("utf-8")
    return hashlib.sha256(b"jaxinfer-kv\0" + namespace + b"\0" + salt).digest()


@dataclasses.dataclass(frozen=True)
class PrefixHit:
    """The longest cached prefix of a request, in whole pages (from `get_computed_pages`).

    pages[i] is the device page holding prefix page i, or 0 where that page is in the host tier;
    host_slots lists the host slot of each such page, in order.
    """

    pages: tuple[int, ...] = ()
    host_slots: tuple[int, ...] = ()
    hashes: tuple[bytes, ...] = ()
    page_size: int = 1

    @property
    def num_tokens(self) -> int:
        return len(self.pages) * self.page_size

    @property
    def num_host_tokens(self) -> int:
        return len(self.host_slots) * self.page_size

    @property
    def num_device_tokens(self) -> int:
        return self.num_tokens - self.num_host_tokens


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class BlockManager:
    """Allocates KV pages to requests.

    Args:
      num_pages: pages in the device pool, including the reserved page 0 (so >= 2).
      page_size: tokens per page.
      enable_prefix_caching: keep hashed full pages for reuse by later requests.
      watermark_pages: pages a NEW request may not dip into, so running requests can still grow
        without preempting right after an admission (vLLM's watermark).
      num_host_pages: pages of the host-memory tier evicted cached pages move to (0: none).
      namespace: the model's identity; every hash chain starts from it.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False,
                 watermark_pages: int = 0, num_host_pages: int = 0, namespace: bytes = b""):
        _positive_int("num_pages", num_pages)
        _positive_int("page_size", page_size)
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        if not isinstance(watermark_pages, int) or not 0 <= watermark_pages < num_pages - 1:
            raise ValueError(
                f"watermark_pages must be in [0, {num_pages - 1}) for {num_pages} pages, got {watermark_pages!r}")
        if num_host_pages and not enable_prefix_caching:
            raise ValueError("a host KV tier holds prefix-cache pages: it needs enable_prefix_caching")
        if not isinstance(namespace, bytes):
            raise ValueError(f"namespace must be bytes, got {type(namespace).__name__}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.namespace = namespace
        self.host = HostTier(num_host_pages)
        self.watermark_pages = watermark_pages
        self._ref_counts = [0] * num_pages
        self._free_uncached: collections.deque[int] = collections.deque(range(1, num_pages))
        self._free_cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._hash_of_page: dict[int, bytes] = {}
        self._page_of_hash: dict[bytes, int] = {}
        self._tables: dict[str, list[int]] = {}
        # Per request, how many of its leading pages `cache_computed_pages` has considered (each
        # is published, or left private because its prefix was cached elsewhere first).
        self._num_hashed: dict[str, int] = {}
        # Device work of the step being planned (see take_transfer_ops).
        self._offload_ops: list[tuple[int, int]] = []
        self._reload_ops: list[tuple[int, int]] = []
        # Lookup counters, vLLM's: queries and device hits; external (host tier) queries and
        # hits; prompt tokens served from either. Counted once per admission (`record_admission`).
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.num_external_query_tokens = 0
        self.num_external_hit_tokens = 0

    # ----- accounting -------------------------------------------------------------------------

    @property
    def num_allocatable_pages(self) -> int:
        """Pages that can ever be handed out (all but the reserved page 0)."""
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages with ref count 0, cached or not."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_admissible_pages(self) -> int:
        """Free pages a new request may take: the free pages above the watermark."""
        return max(0, self.num_free_pages - self.watermark_pages)

    @property
    def num_cached_free_pages(self) -> int:
        return len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of allocatable pages in use (ref count >= 1)."""
        return 1.0 - self.num_free_pages / self.num_allocatable_pages

    @property
    def prefix_hit_rate(self) -> float:
        """Tokens found on the device over tokens looked up (0 before any lookup)."""
        if not self.num_prefix_query_tokens:
            return 0.0
        return self.num_prefix_hit_tokens / self.num_prefix_query_tokens

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._tables

    def request_ids(self) -> Iterator[str]:
        return iter(self._tables)

    def block_table(self, request_id: str, start: int = 0) -> list[int]:
        """A copy of the request's page ids in position order, from table index `start` on."""
        return self._require(request_id)[start:]

    def num_request_pages(self, request_id: str) -> int:
        return len(self._require(request_id))

    def ref_count(self, page_id: int) -> int:
        return self._ref_counts[page_id]

    def free_page_ids(self) -> list[int]:
        """Free pages: uncached first, then cached ones from least to most recently used."""
        return list(self._free_uncached) + list(self._free_cached)

    def cached_page_ids(self) -> list[int]:
        """Pages (in use or free) whose hash is in the prefix cache."""
        return list(self._hash_of_page)

    def _require(self, request_id: str) -> list[int]:
        table = self._tables.get(request_id)
        if table is None:
            raise KeyError(f"request {request_id!r} holds no pages")
        return table

    # ----- allocation ---------------------------------------------------------------------------

    def allocate_slots(self, request_id: str, num_tokens_total: int,
                       prefix_hit: PrefixHit | None = None) -> list[int] | None:
        """Makes sure the request has pages for `num_tokens_total` tokens.

        A request without a table is a new admission: its table starts with the pages of
        `prefix_hit` (from `get_computed_pages`, looked up just before), device pages taken back
        and host-tier pages given fresh device pages that reloads fill; the watermark is kept
        free. A running request may use every free page.

        Returns the page ids appended to the table (the hit's first), or None, changing nothing,
        when there are not enough free pages.
        """
        if not isinstance(num_tokens_total, int) or num_tokens_total < 0:
            raise ValueError(f"num_tokens_total must be a non-negative integer, got {num_tokens_total!r}")
        table = self._tables.get(request_id)
        if table is not None and prefix_hit is None and num_tokens_total <= len(table) * self.page_size:
            return []  # a running request within its pages: most decode steps (called per request per step)
        is_new = table is None
        hit = prefix_hit or PrefixHit(page_size=self.page_size)
        if hit.pages:
            if not is_new:
                raise ValueError(f"request {request_id!r} already holds pages; a prefix hit is for admission")
            self._check_hit(hit)
        num_held = len(hit.pages) if is_new else len(table)
        num_new = max(0, self.pages_for(num_tokens_total) - num_held)
        # Cached pages with ref count 0 leave the free pool when taken back; reloads take free pages.
        num_revived = sum(1 for page in hit.pages if page and self._ref_counts[page] == 0)
        available = self.num_admissible_pages if is_new else self.num_free_pages
        if num_new + num_revived + len(hit.host_slots) > available:
            return None
        if is_new:
            table = self._tables[request_id] = []
            self._num_hashed[request_id] = len(hit.pages)
        # Host entries first become most recently used, so this admission's own offloads do
        # not pick their slots; device pages are revived before any free page is taken, so
        # taking one cannot evict them.
        for digest, page in zip(hit.hashes, hit.pages):
            if not page:
                self.host.touch(digest)
        for page in hit.pages:
            if page:
                if self._ref_counts[page] == 0:
                    del self._free_cached[page]
                self._ref_counts[page] += 1
        added = []
        host_slots = iter(hit.host_slots)
        for digest, page in zip(hit.hashes, hit.pages):
            if not page:
                page = self._take_free_page()
                self._reload_ops.append((next(host_slots), page))
                # Published at once: the reload lands before the step that reads the page.
                self._page_of_hash[digest] = page
                self._hash_of_page[page] = digest
            added.append(page)
        added += [self._take_free_page() for _ in range(num_new)]
        table.extend(added)
        return added

    def _check_hit(self, hit: PrefixHit) -> None:
        if hit.page_size != self.page_size or len(hit.hashes) != len(hit.pages):
            raise ValueError("prefix_hit does not come from this block manager's get_computed_pages")
        device = [p for p in hit.pages if p]
        if len(set(device)) != len(device):
            raise ValueError(f"prefix_hit repeats a page: {hit.pages}")
        host = iter(hit.host_slots)
        for digest, page in zip(hit.hashes, hit.pages):
            if page and self._hash_of_page.get(page) != digest:
                raise ValueError(f"page {page} is not in the prefix cache")
            if not page and self.host.lookup(digest) != next(host, None):
                raise ValueError("a host-tier page of prefix_hit is no longer in the host tier")
        if next(host, None) is not None:
            raise ValueError("prefix_hit has more host slots than host pages")

    def _take_free_page(self) -> int:
        if self._free_uncached:
            page = self._free_uncached.popleft()
        else:
            page, _ = self._free_cached.popitem(last=False)
            digest = self._hash_of_page[page]
            self._uncache(page)
            slot = self.host.store(digest)
            if slot is not None:
                self._offload_ops.append((page, slot))
        self._ref_counts[page] = 1
        return page

    def _uncache(self, page: int) -> None:
        del self._page_of_hash[self._hash_of_page.pop(page)]

    def take_transfer_ops(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The step's host-tier copies, once: (offloads as (device page, host slot), reloads as
        (host slot, device page)). Call once per planned step and hand both to the runner with
        it; from then on this step's offloaded pages can be found in the host tier."""
        ops = self._offload_ops, self._reload_ops
        self._offload_ops, self._reload_ops = [], []
        self.host.end_step()
        return ops

    def free(self, request_id: str) -> None:
        """Drops the request's table and its refs; unknown ids are ignored."""
        table = self._tables.pop(request_id, None)
        self._num_hashed.pop(request_id, None)
        if table is None:
            return
        # Tail pages first, so LRU eviction takes a prefix's end before its shared beginning.
        for page in reversed(table):
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                if page in self._hash_of_page:
                    self._free_cached[page] = None
                else:
                    self._free_uncached.append(page)

    # ----- forks and copy-on-write -----------------------------------------------------------------

    def fork(self, parent_id: str, child_id: str, num_tokens: int | None = None) -> None:
        """Gives `child_id` the parent's pages for its first `num_tokens` tokens (default: all).

        The pages are shared (ref counts up); call `prepare_write` before writing into them.
        """
        parent = self._require(parent_id)
        if child_id in self._tables:
            raise ValueError(f"request {child_id!r} already holds pages")
        if num_tokens is None:
            num_shared = len(parent)
            num_full = self._num_hashed[parent_id]
        else:
            if not isinstance(num_tokens, int) or not 0 <= num_tokens <= len(parent) * self.page_size:
                raise ValueError(f"cannot fork {num_tokens!r} tokens from {parent_id!r}, which has "
                                 f"{len(parent)} pages of {self.page_size}")
            num_shared = self.pages_for(num_tokens)
            # Only pages the child fills entirely with the parent's tokens keep their hash.
            num_full = min(num_tokens // self.page_size, self._num_hashed[parent_id])
        shared = parent[:num_shared]
        for page in shared:
            self._ref_counts[page] += 1
        self._tables[child_id] = shared
        self._num_hashed[child_id] = num_full

    def prepare_write(self, request_id: str, start_pos: int, end_pos: int) -> list[tuple[int, int]] | None:
        """Makes positions [start_pos, end_pos) of the request writable.

        Each page in the range shared with another table (ref count > 1) is replaced by a private
        copy; the returned `(src_page, dst_page)` ops tell the runner to copy the KV before the
        step writes. A private page that is in the prefix cache leaves the cache instead, since
        its contents are about to change. Returns None, changing nothing, when there are not
        enough free pages for the copies.
        """
        table = self._require(request_id)
        if not 0 <= start_pos <= end_pos <= len(table) * self.page_size:
            raise ValueError(f"write range [{start_pos}, {end_pos}) is outside the {len(table)} pages "
                             f"of request {request_id!r}; allocate slots first")
        if start_pos == end_pos:
            return []
        first, last = start_pos // self.page_size, (end_pos - 1) // self.page_size
        if first == last and self._ref_counts[table[first]] == 1 and table[first] not in self._hash_of_page:
            return []  # one private, uncached page: a decode's usual write, nothing to do
        indices = range(first, last + 1)
        if sum(1 for i in indices if self._ref_counts[table[i]] > 1) > self.num_free_pages:
            return None
        copy_ops = []
        for i in indices:
            page = table[i]
            if self._ref_counts[page] > 1:
                copy = self._take_free_page()
                self._ref_counts[page] -= 1
                table[i] = copy
                copy_ops.append((page, copy))
            elif page in self._hash_of_page:
                self._uncache(page)
        return copy_ops

    # ----- prefix caching -------------------------------------------------------------------------

    def extend_block_hashes(self, hashes: list[bytes], token_ids: Sequence[int], cache_salt: str | None = None) -> int:
        """Appends to `hashes` the chained hash of every full page of `token_ids` it lacks (those of
        the pages before are kept, so tokens are hashed once as they arrive). Returns how many."""
        parent = hashes[-1] if hashes else namespace_root(self.namespace, cache_salt)
        ps = self.page_size
        start = len(hashes)
        for i in range(start, len(token_ids) // ps):
            parent = _chain_hash(parent, token_ids[i * ps:(i + 1) * ps])
            hashes.append(parent)
        return len(hashes) - start

    def hash_blocks(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[bytes]:
        """The chained hashes of every full page of `token_ids`."""
        hashes: list[bytes] = []
        self.extend_block_hashes(hashes, token_ids, cache_salt)
        return hashes

    def get_computed_pages(self, block_hashes: Sequence[bytes], num_tokens: int) -> PrefixHit:
        """Longest cached prefix of a request of `num_tokens` tokens whose full pages hash to
        `block_hashes`: on the device first, a page at a time, else in the host tier.

        The last token is never covered. Changes nothing and counts nothing (`record_admission`
        counts once the request is admitted). Pass the hit to `allocate_slots` before any other
        allocation.
        """
        if not self.enable_prefix_caching:
            return PrefixHit(page_size=self.page_size)
        pages, slots, hashes = [], [], []
        for digest in block_hashes[:max(0, num_tokens - 1) // self.page_size]:
            page = self._page_of_hash.get(digest)
            if page is None:
                slot = self.host.lookup(digest)
                if slot is None:
                    break
                page = 0
                slots.append(slot)
            pages.append(page)
            hashes.append(digest)
        return PrefixHit(tuple(pages), tuple(slots), tuple(hashes), self.page_size)

    def cached_device_pages(self, block_hashes: Sequence[bytes]) -> list[int]:
        """The device pages holding the leading run of `block_hashes` that is cached on the
        device (pages another engine may copy; see engine/disaggregated.py)."""
        pages = []
        for digest in block_hashes:
            page = self._page_of_hash.get(digest)
            if page is None:
                break
            pages.append(page)
        return pages

    def import_host_page(self, digest: bytes) -> int | None:
        """A host-tier slot for a page moved in from elsewhere under hash `digest`, which the
        caller fills before the next step; None when this engine already holds the hash (on the
        device or in the tier) or has no tier."""
        if digest in self._page_of_hash:
            return None
        return self.host.insert(digest)

    def drop_host_slots(self, slots) -> None:
        """Forgets host-tier slots whose memory the runner let go (see kv_offload.py). Call
        before planning the next step, so that no reload reads them."""
        self.host.drop_slots(slots)

    def record_admission(self, num_tokens: int, hit: PrefixHit) -> None:
        """Counts one admitted request's lookup: its tokens as queries, the hit as hits."""
        self.num_prefix_query_tokens += num_tokens
        self.num_prefix_hit_tokens += hit.num_device_tokens
        if self.host.num_slots:
            self.num_external_query_tokens += num_tokens
            self.num_external_hit_tokens += hit.num_host_tokens

    def cache_computed_pages(self, request_id: str, block_hashes: Sequence[bytes], num_computed_tokens: int) -> None:
        """Publishes the request's full pages whose KV is computed (the first num_computed_tokens);
        `block_hashes` are the request's (`extend_block_hashes`).

        Call after the step that computed them has run. A prefix already cached under another
        page keeps that page; this one stays private.
        """
        if not self.enable_prefix_caching:
            return
        table = self._require(request_id)
        num_full = min(num_computed_tokens // self.page_size, len(block_hashes))
        if num_full > len(table):
            raise ValueError(f"request {request_id!r} claims {num_computed_tokens} computed tokens "
                             f"but holds {len(table)} pages")
        for i in range(self._num_hashed[request_id], num_full):
            digest, page = block_hashes[i], table[i]
            if digest not in self._page_of_hash and page not in self._hash_of_page:
                self._page_of_hash[digest] = page
                self._hash_of_page[page] = digest
        self._num_hashed[request_id] = max(self._num_hashed[request_id], num_full)
