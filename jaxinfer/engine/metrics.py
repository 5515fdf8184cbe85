"""Engine metrics kept in plain Python: counters, gauges and latency histograms.

Names follow vLLM's Prometheus metrics (without the `vllm:` prefix) so that the server can
export them under familiar names and existing dashboards work.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from typing import Sequence

# Bucket upper bounds in seconds, as vLLM uses for the same histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclasses.dataclass
class Histogram:
    """Cumulative-style histogram: counts per bucket upper bound, plus sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = dataclasses.field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)  # the last bucket is +Inf

    def observe(self, value: float):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    @classmethod
    def merged(cls, parts: Sequence["Histogram"]) -> "Histogram":
        """One histogram of every observation of `parts` (which share their bucket bounds)."""
        bounds = parts[0].bounds
        if any(h.bounds != bounds for h in parts):
            raise ValueError("only histograms with the same bucket bounds can be merged")
        return cls(bounds, [sum(c) for c in zip(*(h.counts for h in parts))], sum(h.total for h in parts),
                   sum(h.count for h in parts))

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) pairs ending with (+inf, count)."""
        out, running = [], 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts):
            running += c
            out.append((bound, running))
        return out


@dataclasses.dataclass
class EngineMetrics:
    """Everything the engine measures; read a consistent copy with `snapshot()`."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage_perc: float = 0.0
    num_preemptions_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    # The host KV tier's lookups (vLLM counts its offloading connector's as "external"): prompt
    # tokens of requests admitted while the tier exists, and tokens reloaded from it.
    external_prefix_cache_queries_total: int = 0
    external_prefix_cache_hits_total: int = 0
    # Speculative decoding (vLLM's spec_decode_* counters): steps in which a request verified
    # proposals, proposed tokens, accepted ones, and accepted ones by position in the proposal.
    # The exact response cache (jaxinfer's own): deterministic requests looked up, and answered.
    response_cache_queries_total: int = 0
    response_cache_hits_total: int = 0
    spec_decode_num_drafts_total: int = 0
    spec_decode_num_draft_tokens_total: int = 0
    spec_decode_num_accepted_tokens_total: int = 0
    spec_decode_num_accepted_tokens_per_pos_total: list[int] = dataclasses.field(default_factory=list)
    request_success_total: dict[str, int] = dataclasses.field(default_factory=dict)
    time_to_first_token_seconds: Histogram = dataclasses.field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    inter_token_latency_seconds: Histogram = dataclasses.field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e_request_latency_seconds: Histogram = dataclasses.field(default_factory=lambda: Histogram(E2E_BUCKETS))
    iteration_tokens_total: Histogram = dataclasses.field(
        default_factory=lambda: Histogram(STEP_TOKEN_BUCKETS))
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def record_finished(self, finish_reason: str, e2e_seconds: float):
        with self._lock:
            self.request_success_total[finish_reason] = self.request_success_total.get(finish_reason, 0) + 1
            self.e2e_request_latency_seconds.observe(e2e_seconds)

    def record_response_cache(self, queries_total: int, hits_total: int):
        with self._lock:
            self.response_cache_queries_total = queries_total
            self.response_cache_hits_total = hits_total

    def record_spec_decode(self, num_draft_tokens: int, num_accepted: int):
        """One request's verification: num_accepted of its num_draft_tokens proposals passed."""
        with self._lock:
            self.spec_decode_num_drafts_total += 1
            self.spec_decode_num_draft_tokens_total += num_draft_tokens
            self.spec_decode_num_accepted_tokens_total += num_accepted
            per_pos = self.spec_decode_num_accepted_tokens_per_pos_total
            per_pos.extend([0] * (num_draft_tokens - len(per_pos)))
            for pos in range(num_accepted):
                per_pos[pos] += 1

    @property
    def spec_decode_acceptance_rate(self) -> float | None:
        """Accepted over proposed tokens (None before any proposal)."""
        drafted = self.spec_decode_num_draft_tokens_total
        return self.spec_decode_num_accepted_tokens_total / drafted if drafted else None

    @property
    def spec_decode_mean_accepted_length(self) -> float | None:
        """Tokens a verifying request gains per step: 1 + accepted proposals (vLLM's mean
        acceptance length); None before any proposal."""
        drafts = self.spec_decode_num_drafts_total
        return 1 + self.spec_decode_num_accepted_tokens_total / drafts if drafts else None

    def record_step(self, *, num_prompt_tokens: int, num_generation_tokens: int, num_running: int,
                    num_waiting: int, kv_usage: float, num_preemptions_total: int,
                    ttfts: list[float], itls: list[float], prefix_cache_queries_total: int = 0,
                    prefix_cache_hits_total: int = 0, external_prefix_cache_queries_total: int = 0,
                    external_prefix_cache_hits_total: int = 0):
        with self._lock:
            self.prefix_cache_queries_total = prefix_cache_queries_total
            self.prefix_cache_hits_total = prefix_cache_hits_total
            self.external_prefix_cache_queries_total = external_prefix_cache_queries_total
            self.external_prefix_cache_hits_total = external_prefix_cache_hits_total
            self.prompt_tokens_total += num_prompt_tokens
            self.generation_tokens_total += num_generation_tokens
            self.num_requests_running = num_running
            self.num_requests_waiting = num_waiting
            self.kv_cache_usage_perc = kv_usage
            self.num_preemptions_total = num_preemptions_total
            self.iteration_tokens_total.observe(num_prompt_tokens + num_generation_tokens)
            for v in ttfts:
                self.time_to_first_token_seconds.observe(v)
            for v in itls:
                self.inter_token_latency_seconds.observe(v)

    def __getstate__(self):
        """Pickled without its lock (a snapshot travels from an engine process to the server)."""
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def snapshot(self) -> "EngineMetrics":
        import copy

        with self._lock:
            fields = {f.name: copy.deepcopy(getattr(self, f.name))
                      for f in dataclasses.fields(self) if f.name != "_lock"}
        return EngineMetrics(**fields)


# Gauges of fractions: merged engines report their mean (the pooled fraction when their KV
# caches are the same size); every other number is a count and is summed.
_AVERAGED = frozenset({"kv_cache_usage_perc"})


def merge_metrics(parts: Sequence[EngineMetrics]) -> EngineMetrics:
    """Several engines' metrics as one engine's (a data-parallel front end's replicas, served as
    one model): counters and request-count gauges summed, per-reason and per-position counts
    summed key by key, histograms merged bucket by bucket, the KV usage fraction averaged.

    Args:
      parts: at least one EngineMetrics, read as they are (pass snapshots of live ones).
    """
    if not parts:
        raise ValueError("merge_metrics needs at least one EngineMetrics")
    fields = {}
    for f in dataclasses.fields(EngineMetrics):
        if f.name == "_lock":
            continue
        values = [getattr(m, f.name) for m in parts]
        if isinstance(values[0], Histogram):
            fields[f.name] = Histogram.merged(values)
        elif isinstance(values[0], dict):
            fields[f.name] = {k: sum(v.get(k, 0) for v in values) for k in sorted({k for v in values for k in v})}
        elif isinstance(values[0], list):
            width = max(len(v) for v in values)
            fields[f.name] = [sum(v[i] for v in values if i < len(v)) for i in range(width)]
        elif f.name in _AVERAGED:
            fields[f.name] = sum(values) / len(values)
        else:
            fields[f.name] = sum(values)
    return EngineMetrics(**fields)
