"""Request state as the scheduler sees it: token ids, progress, status and stop conditions.

Host Python only. The stop conditions are plain fields the engine copies from its sampling
parameters, so this module knows nothing of samplers or tokenizers.
"""

from __future__ import annotations

import enum
import time
from typing import Iterable, Sequence


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS


# finish_reason as the OpenAI API names it, per finished status.
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}
FINISHED_STATUS_BY_REASON = {reason: status for status, reason in _FINISH_REASONS.items()}


def _token_tuple(name: str, ids: Iterable[int]) -> tuple[int, ...]:
    ids = tuple(ids)
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"{name} must hold non-negative integer token ids, got {t!r}")
    return ids


class TokenTail(Sequence):
    """A read-only view of a token list from `start` on, made in O(1): the host hands a
    request's outputs to the sampler's bookkeeping every step, and copying them there would
    cost in proportion to the output's length."""

    __slots__ = ("_tokens", "_start")

    def __init__(self, tokens: list[int], start: int):
        self._tokens, self._start = tokens, start

    def __len__(self) -> int:
        return len(self._tokens) - self._start

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._tokens[self._start:][index]
        n = len(self)
        if not -n <= index < n:
            raise IndexError("token index out of range")
        return self._tokens[self._start + (index if index >= 0 else n + index)]


class Request:
    """One generation request: its tokens, how many have KV in the cache, and when it stops.

    Args:
      request_id: unique id (a string).
      prompt_token_ids: the prompt, non-empty.
      max_tokens: most output tokens to generate (None: until max_model_len).
      min_tokens: the first `min_tokens` output tokens never stop the request (the sampler
        masks eos and stop ids for them; the scheduler does not stop on them either).
      eos_token_ids: tokens that stop the request unless `ignore_eos`.
      stop_token_ids: tokens that always stop the request (after min_tokens).
      ignore_eos: do not stop on eos_token_ids.
      priority: lower values are served first under the "priority" policy.
      arrival_time: seconds on any monotonic clock; orders requests of equal priority.
      use_prefix_cache: take cached prefix pages (False: compute every position).
      cache_salt: the request's prefix-cache namespace: requests share cached pages only when
        their salts are equal (vLLM's `cache_salt`).

    Output tokens are appended through `append_output_token`; the stop token itself is kept in
    `output_token_ids` (the detokenizer decides whether to show it).
    """

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int], *,
                 max_tokens: int | None = None, min_tokens: int = 0,
                 eos_token_ids: Iterable[int] = (), stop_token_ids: Iterable[int] = (),
                 ignore_eos: bool = False, priority: int = 0, arrival_time: float | None = None,
                 use_prefix_cache: bool = True, cache_salt: str | None = None):
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        prompt = _token_tuple("prompt_token_ids", prompt_token_ids)
        if not prompt:
            raise ValueError(f"request {request_id!r}: prompt_token_ids is empty")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"request {request_id!r}: max_tokens must be >= 1 or None, got {max_tokens!r}")
        if not isinstance(min_tokens, int) or min_tokens < 0:
            raise ValueError(f"request {request_id!r}: min_tokens must be >= 0, got {min_tokens!r}")
        if max_tokens is not None and min_tokens > max_tokens:
            raise ValueError(
                f"request {request_id!r}: min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"request {request_id!r}: cache_salt must be a non-empty string or None, "
                             f"got {cache_salt!r}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"request {request_id!r}: priority must be an integer, got {priority!r}")
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.eos_token_ids = frozenset(_token_tuple("eos_token_ids", eos_token_ids))
        self.stop_token_ids = frozenset(_token_tuple("stop_token_ids", stop_token_ids))
        self.ignore_eos = bool(ignore_eos)
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else float(arrival_time)
        # False when every prompt position must be computed (prompt logprobs score each one).
        self.use_prefix_cache = bool(use_prefix_cache)
        self.cache_salt = cache_salt
        # The chained hash of each full page of its tokens, extended as tokens arrive (by the
        # scheduler, through the block manager), so a request is hashed once.
        self.block_hashes: list[bytes] = []
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        # Tokens sampled by scheduled steps whose results have not come back yet (asynchronous
        # scheduling): their positions can be computed already, their ids are on the device.
        self.num_output_placeholders = 0
        # Speculative decoding: tokens proposed to follow the known ones, which the next
        # schedule() verifies in the step (taken and cleared by it).
        self.spec_token_ids: list[int] = []
        # Prompt and outputs in one list, so handing all tokens out costs no concatenation.
        self._token_ids = list(prompt)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self._token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """Known tokens plus those sampled by steps still in flight."""
        return len(self._token_ids) + self.num_output_placeholders

    def may_generate_more(self, max_model_len: int) -> bool:
        """Whether a token after the ones in flight could still be wanted (no length limit hit);
        a stop token among those in flight is learnt only when they come back."""
        if not self.num_output_placeholders:
            return True
        total = self.num_tokens_with_placeholders
        out = total - self.num_prompt_tokens
        return total < max_model_len and (self.max_tokens is None or out < self.max_tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self._token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self._token_ids[len(self.prompt_token_ids):]

    @property
    def output_view(self) -> TokenTail:
        """The output tokens as a live O(1) view (no copy): do not keep it across steps when a
        copy is meant."""
        return TokenTail(self._token_ids, len(self.prompt_token_ids))

    @property
    def all_token_ids(self) -> Sequence[int]:
        """Prompt then outputs. A live view: do not mutate it."""
        return self._token_ids

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length" or "abort" once finished, else None."""
        return _FINISH_REASONS.get(self.status)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self._token_ids.append(token_id)

    def stop_status(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the latest output token calls for, or None to continue.

        A stop token (eos unless ignore_eos, or a stop id) wins over reaching a length limit in
        the same token, so a natural end reports "stop".
        """
        num_out = self.num_output_tokens
        if num_out > self.min_tokens:
            last = self._token_ids[-1]
            if last in self.stop_token_ids or (not self.ignore_eos and last in self.eos_token_ids):
                return RequestStatus.FINISHED_STOPPED
        if self.num_tokens >= max_model_len or (self.max_tokens is not None and num_out >= self.max_tokens):
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"outputs={self.num_output_tokens}, computed={self.num_computed_tokens}, "
                f"priority={self.priority})")
