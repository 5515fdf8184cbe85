"""What the engine returns per request (vLLM-compatible names)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the raw model output and its rank among the vocabulary
    (1 = most likely; tokens tied with it count as ahead of it). As vLLM's `Logprob`;
    `decoded_token` is left None (the server renders tokens itself)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """One of the n completions of a request.

    logprobs: per generated token, a dict token id -> Logprob holding the sampled token (with
      its exact rank) and the requested top-n (ranks 1..n); None when logprobs were not requested.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the matched stop string or stop token id
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic seconds) of one request's milestones."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    token_times: list[float] = dataclasses.field(default_factory=list)  # per output token (completion 0)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # None for the first token
    metrics: RequestMetrics | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def merge_deltas(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta output carrying two consecutive ones of the same request (DELTA output kind):
    each completion's text, tokens and logprobs concatenated, its finish state and cumulative
    logprob from the later one. Lets a consumer that fell behind take what queued up in one piece."""
    merged = {c.index: c for c in first.outputs}
    for c in later.outputs:
        prev = merged.get(c.index)
        if prev is None:
            merged[c.index] = c
            continue
        logprobs = None
        if prev.logprobs is not None or c.logprobs is not None:
            logprobs = list(prev.logprobs or []) + list(c.logprobs or [])
        merged[c.index] = dataclasses.replace(
            c, text=prev.text + c.text, token_ids=list(prev.token_ids) + list(c.token_ids), logprobs=logprobs)
    return dataclasses.replace(later, outputs=list(merged.values()),
                               prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None
                               else later.prompt_logprobs, extra={**first.extra, **later.extra})
