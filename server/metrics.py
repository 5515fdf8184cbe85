"""/metrics: the engine's counters, gauges and histograms in Prometheus text format.

Names mirror vLLM's (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...) so
dashboards built for vLLM work unchanged; the same series also appear under `jaxinfer:`.
docs/metrics.md lists them.
"""

from __future__ import annotations

import dataclasses
import math

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from jaxinfer.engine.metrics import EngineMetrics, Histogram

PREFIXES = ("vllm", "jaxinfer")
CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclasses.dataclass
class MetricsSample:
    """One consistent reading of the engine, taken on its thread."""

    metrics: EngineMetrics
    num_running: int
    num_waiting: int
    kv_usage: float


def sample_engine(engine) -> MetricsSample:
    """Reads the engine's metrics; run it on the engine thread (`AsyncLLMEngine.call`).

    Running/waiting counts and KV usage are read live rather than from the last step's record,
    so they drop to zero when requests are aborted between steps.
    """
    return MetricsSample(engine.metrics.snapshot(), engine.scheduler.num_running, engine.scheduler.num_waiting,
                         float(engine.block_manager.usage))


# (name, help) of each series; the prefix and, for counters, `_total` are added when rendering.
_GAUGES = (
    ("num_requests_running", "Number of requests in model execution batches."),
    ("num_requests_waiting", "Number of requests waiting to be processed."),
    ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
)
_COUNTERS = (
    ("num_preemptions", "Cumulative number of preemptions from the engine.", "num_preemptions_total"),
    ("prompt_tokens", "Number of prefill tokens processed.", "prompt_tokens_total"),
    ("generation_tokens", "Number of generation tokens processed.", "generation_tokens_total"),
    ("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
     "prefix_cache_queries_total"),
    ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hits_total"),
    ("external_prefix_cache_queries", "External prefix cache queries from the host KV tier, in terms of number "
     "of queried tokens.", "external_prefix_cache_queries_total"),
    ("external_prefix_cache_hits", "External prefix cache hits from the host KV tier, in terms of number of "
     "cached tokens.", "external_prefix_cache_hits_total"),
    ("spec_decode_num_drafts", "Number of spec decoding drafts.", "spec_decode_num_drafts_total"),
    ("spec_decode_num_draft_tokens", "Number of draft tokens.", "spec_decode_num_draft_tokens_total"),
    ("spec_decode_num_accepted_tokens", "Number of accepted tokens.", "spec_decode_num_accepted_tokens_total"),
)
_HISTOGRAMS = (
    ("time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
    ("e2e_request_latency_seconds", "Histogram of end to end request latency in seconds."),
    ("iteration_tokens_total", "Histogram of number of tokens per engine_step."),
)
FINISH_REASONS = ("stop", "length", "abort")


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    return [("+Inf" if math.isinf(bound) else repr(float(bound)), count) for bound, count in h.cumulative()]


def families(sample: MetricsSample, model_name: str, prefix: str):
    """The metric families of one sample under `prefix` ("vllm" or "jaxinfer")."""
    m = sample.metrics
    labels, values = ["model_name"], [model_name]
    gauges = {"num_requests_running": sample.num_running, "num_requests_waiting": sample.num_waiting,
              "kv_cache_usage_perc": sample.kv_usage}
    for name, doc in _GAUGES:
        g = GaugeMetricFamily(f"{prefix}:{name}", doc, labels=labels)
        g.add_metric(values, gauges[name])
        yield g
    for name, doc, field in _COUNTERS:
        c = CounterMetricFamily(f"{prefix}:{name}", doc, labels=labels)
        c.add_metric(values, getattr(m, field))
        yield c
    success = CounterMetricFamily(f"{prefix}:request_success", "Count of successfully processed requests.",
                                  labels=[*labels, "finished_reason"])
    for reason in sorted(set(FINISH_REASONS) | set(m.request_success_total)):
        success.add_metric([model_name, reason], m.request_success_total.get(reason, 0))
    yield success
    if prefix == "jaxinfer":  # no vLLM counterpart
        for name, doc in (("response_cache_queries", "Deterministic requests looked up in the response cache."),
                          ("response_cache_hits", "Requests answered from the response cache.")):
            c = CounterMetricFamily(f"{prefix}:{name}", doc, labels=labels)
            c.add_metric(values, getattr(m, f"{name}_total"))
            yield c
    per_pos = CounterMetricFamily(f"{prefix}:spec_decode_num_accepted_tokens_per_pos",
                                  "Accepted tokens per draft position.", labels=[*labels, "position"])
    for pos, count in enumerate(m.spec_decode_num_accepted_tokens_per_pos_total):
        per_pos.add_metric([model_name, str(pos)], count)
    yield per_pos
    for name, doc in _HISTOGRAMS:
        h: Histogram = getattr(m, name)
        fam = HistogramMetricFamily(f"{prefix}:{name}", doc, labels=labels)
        fam.add_metric(values, _buckets(h), sum_value=h.total)
        yield fam


class _Families:
    """A one-shot collector over already-built families (what generate_latest reads)."""

    def __init__(self, fams):
        self._fams = list(fams)

    def collect(self):
        return self._fams


class MetricsRenderer:
    """Renders engine samples plus this process's own metrics (resident memory, CPU time)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._process = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._process)

    def render(self, sample: MetricsSample, disconnects: int = 0) -> bytes:
        """The engine's series under both prefixes, the server's own, then the process's.

        Args:
          sample: the engine reading.
          disconnects: requests whose client went away before their answer was complete.
        """
        fams = [f for prefix in PREFIXES for f in families(sample, self.model_name, prefix)]
        # The server's own series have no vLLM counterpart, so they appear under jaxinfer: only.
        gone = CounterMetricFamily("jaxinfer:request_disconnects", "Requests whose client disconnected before "
                                   "the answer was complete (each aborted in the engine).", labels=["model_name"])
        gone.add_metric([self.model_name], disconnects)
        fams.append(gone)
        return generate_latest(_Families(fams)) + generate_latest(self._process)
