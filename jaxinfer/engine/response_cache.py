"""The exact response cache: finished outputs of deterministic requests, replayed on a repeat.

A request is deterministic when it is greedy, or sampled with a seed the user gave (the engine
seeds the others itself, differently each time): the same prompt, parameters and cache salt
then always give the same completions, so a repeat can be answered without running the model.
Opt-in (`EngineConfig.response_cache_size`), bounded (least recently used entries leave first).

Host Python only: this module must not import jax.
"""

from __future__ import annotations

import collections
import copy
from typing import Sequence

from jaxinfer.sampling_params import RequestOutputKind, SamplingParams


class ResponseCache:
    """At most `max_entries` finished responses, keyed by what determines them."""

    def __init__(self, max_entries: int):
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"the response cache needs at least one entry, got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self.num_queries = 0
        self.num_hits = 0

    @staticmethod
    def key(prompt_token_ids: Sequence[int], params: SamplingParams, cache_salt: str | None):
        """The key of a request as the user sent it (before the engine seeds it), or None when
        its output is not determined by it (sampled without a seed)."""
        if not params.greedy and params.seed is None:
            return None
        # How outputs are streamed does not change them; a greedy request ignores its seed.
        params = params.clone(output_kind=RequestOutputKind.CUMULATIVE, seed=None if params.greedy else params.seed)
        return tuple(prompt_token_ids), params, cache_salt

    def get(self, key):
        """The stored (completions, prompt logprobs) of `key` (copies), or None; counts the query."""
        self.num_queries += 1
        entry = self._entries.get(key)
        if entry is None:
            return None
        self.num_hits += 1
        self._entries.move_to_end(key)
        return copy.deepcopy(entry)

    def put(self, key, completions, prompt_logprobs) -> None:
        self._entries[key] = copy.deepcopy((completions, prompt_logprobs))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
