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
hash names the whole prefix up to the end of that page. Pages are published to the cache only
after their KV has been computed (`cache_computed_pages`, called once a step has run); a hit is
therefore always valid KV. A hit never covers a request's last token: it must be computed to
have logits to sample from.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from typing import Iterator, Sequence

_ROOT_HASH = b""


def _chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    # A cryptographic hash: a collision here would silently serve another prompt's KV.
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


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
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False,
                 watermark_pages: int = 0):
        _positive_int("num_pages", num_pages)
        _positive_int("page_size", page_size)
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        if not isinstance(watermark_pages, int) or not 0 <= watermark_pages < num_pages - 1:
            raise ValueError(
                f"watermark_pages must be in [0, {num_pages - 1}) for {num_pages} pages, got {watermark_pages!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.watermark_pages = watermark_pages
        self._ref_counts = [0] * num_pages
        self._free_uncached: collections.deque[int] = collections.deque(range(1, num_pages))
        self._free_cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._hash_of_page: dict[int, bytes] = {}
        self._page_of_hash: dict[bytes, int] = {}
        self._tables: dict[str, list[int]] = {}
        # Per request, the chained hashes of its full computed pages (from its tokens, so they
        # stay valid whichever physical page holds them).
        self._request_hashes: dict[str, list[bytes]] = {}
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

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
        """Cached tokens found over tokens looked up (0 before any lookup)."""
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
                       cached_pages: Sequence[int] = ()) -> list[int] | None:
        """Makes sure the request has pages for `num_tokens_total` tokens.

        A request without a table is a new admission: its table starts with `cached_pages` (a
        prefix hit from `get_computed_pages`), and the watermark is kept free. A running request
        may use every free page.

        Returns the page ids appended to the table (cached pages first), or None, changing
        nothing, when there are not enough free pages.
        """
        if not isinstance(num_tokens_total, int) or num_tokens_total < 0:
            raise ValueError(f"num_tokens_total must be a non-negative integer, got {num_tokens_total!r}")
        table = self._tables.get(request_id)
        is_new = table is None
        cached_pages = list(cached_pages)
        if cached_pages:
            if not is_new:
                raise ValueError(f"request {request_id!r} already holds pages; cached pages are for admission")
            if len(set(cached_pages)) != len(cached_pages):
                raise ValueError(f"cached_pages repeats a page: {cached_pages}")
            for page in cached_pages:
                if page not in self._hash_of_page:
                    raise ValueError(f"page {page} is not in the prefix cache")
        num_held = len(cached_pages) if is_new else len(table)
        num_new = max(0, self.pages_for(num_tokens_total) - num_held)
        # Cached pages with ref count 0 leave the free pool when taken back.
        num_revived = sum(1 for page in cached_pages if self._ref_counts[page] == 0)
        available = self.num_admissible_pages if is_new else self.num_free_pages
        if num_new + num_revived > available:
            return None
        if is_new:
            table = self._tables[request_id] = []
            self._request_hashes[request_id] = [self._hash_of_page[p] for p in cached_pages]
        for page in cached_pages:
            if self._ref_counts[page] == 0:
                del self._free_cached[page]
            self._ref_counts[page] += 1
        added = cached_pages + [self._take_free_page() for _ in range(num_new)]
        table.extend(added)
        return added

    def _take_free_page(self) -> int:
        if self._free_uncached:
            page = self._free_uncached.popleft()
        else:
            page, _ = self._free_cached.popitem(last=False)
            self._uncache(page)
        self._ref_counts[page] = 1
        return page

    def _uncache(self, page: int) -> None:
        del self._page_of_hash[self._hash_of_page.pop(page)]

    def free(self, request_id: str) -> None:
        """Drops the request's table and its refs; unknown ids are ignored."""
        table = self._tables.pop(request_id, None)
        self._request_hashes.pop(request_id, None)
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
            num_full = len(self._request_hashes[parent_id])
        else:
            if not isinstance(num_tokens, int) or not 0 <= num_tokens <= len(parent) * self.page_size:
                raise ValueError(f"cannot fork {num_tokens!r} tokens from {parent_id!r}, which has "
                                 f"{len(parent)} pages of {self.page_size}")
            num_shared = self.pages_for(num_tokens)
            # Only pages the child fills entirely with the parent's tokens keep their hash.
            num_full = min(num_tokens // self.page_size, len(self._request_hashes[parent_id]))
        shared = parent[:num_shared]
        for page in shared:
            self._ref_counts[page] += 1
        self._tables[child_id] = shared
        self._request_hashes[child_id] = self._request_hashes[parent_id][:num_full]

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
        indices = range(start_pos // self.page_size, (end_pos - 1) // self.page_size + 1)
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

    def get_computed_pages(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest cached prefix of `token_ids` in whole pages: (page ids, number of tokens).

        The last token is never covered. Counts the lookup for `prefix_hit_rate`. Pass the pages
        to `allocate_slots(..., cached_pages=...)` before any other allocation.
        """
        if not self.enable_prefix_caching:
            return [], 0
        pages = []
        parent = _ROOT_HASH
        for i in range((len(token_ids) - 1) // self.page_size):
            parent = _chain_hash(parent, token_ids[i * self.page_size:(i + 1) * self.page_size])
            page = self._page_of_hash.get(parent)
            if page is None:
                break
            pages.append(page)
        num_cached = len(pages) * self.page_size
        self.num_prefix_query_tokens += len(token_ids)
        self.num_prefix_hit_tokens += num_cached
        return pages, num_cached

    def cache_computed_pages(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Publishes the request's full pages whose KV is computed (the first num_computed_tokens).

        Call after the step that computed them has run. A prefix already cached under another
        page keeps that page; this one stays private.
        """
        if not self.enable_prefix_caching:
            return
        table = self._require(request_id)
        hashes = self._request_hashes[request_id]
        num_full = min(num_computed_tokens, len(token_ids)) // self.page_size
        if num_full > len(table):
            raise ValueError(f"request {request_id!r} claims {num_computed_tokens} computed tokens "
                             f"but holds {len(table)} pages")
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else _ROOT_HASH
            digest = _chain_hash(parent, token_ids[i * self.page_size:(i + 1) * self.page_size])
            hashes.append(digest)
            page = table[i]
            if digest not in self._page_of_hash and page not in self._hash_of_page:
                self._page_of_hash[digest] = page
                self._hash_of_page[page] = digest
