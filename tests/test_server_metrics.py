"""/metrics parses with prometheus_client's parser, carries vLLM's names, and moves with requests."""

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_fixtures import MODEL_NAME, shared_stack

VLLM_SERIES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_sum", "vllm:iteration_tokens_total_count",
]


@pytest.fixture(scope="module")
def stack():
    return shared_stack()


def scrape(url: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, parsed the way a Prometheus server would."""
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted({"model_name": MODEL_NAME, **labels}.items())))]


def test_names_mirror_vllm_and_jaxinfer(stack):
    samples = scrape(stack.url)
    names = {name for name, _ in samples}
    for series in VLLM_SERIES:
        assert series in names
        assert series.replace("vllm:", "jaxinfer:") in names
    assert value(samples, "vllm:request_success_total", finished_reason="length") >= 0
    assert any(name == "process_resident_memory_bytes" for name in names)


def test_counters_and_histograms_move(stack):
    before = scrape(stack.url)
    r = httpx.post(stack.url + "/v1/completions", timeout=30, json={
        "model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 9, "temperature": 0, "ignore_eos": True})
    usage = r.json()["usage"]
    assert stack.wait_idle() == 0.0
    after = scrape(stack.url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    for prefix in ("vllm", "jaxinfer"):
        assert delta(f"{prefix}:prompt_tokens_total") == usage["prompt_tokens"]
        assert delta(f"{prefix}:generation_tokens_total") == usage["completion_tokens"] == 9
        assert delta(f"{prefix}:request_success_total", finished_reason="length") == 1
        assert delta(f"{prefix}:time_to_first_token_seconds_count") == 1
        assert delta(f"{prefix}:e2e_request_latency_seconds_count") == 1
        assert delta(f"{prefix}:inter_token_latency_seconds_count") == 8
        assert delta(f"{prefix}:e2e_request_latency_seconds_sum") > 0
        ttft_inf = value(after, f"{prefix}:time_to_first_token_seconds_bucket", le="+Inf")
        assert ttft_inf == value(after, f"{prefix}:time_to_first_token_seconds_count")
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0


def test_prefix_cache_counters(stack):
    prompt = list(range(10, 50))  # five full pages of 8 tokens
    before = scrape(stack.url)
    for _ in range(2):
        r = httpx.post(stack.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200
    after = scrape(stack.url)
    queries = value(after, "vllm:prefix_cache_queries_total") - value(before, "vllm:prefix_cache_queries_total")
    hits = value(after, "vllm:prefix_cache_hits_total") - value(before, "vllm:prefix_cache_hits_total")
    assert queries >= 2 * len(prompt) - 2 and hits >= 32  # the second request found the first's full pages
    assert hits == value(after, "jaxinfer:prefix_cache_hits_total") - value(before, "jaxinfer:prefix_cache_hits_total")


def test_gauges_show_a_running_request(stack):
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    started = threading.Event()
    seen = {}

    def watch():
        with httpx.stream("POST", stack.url + "/v1/completions", json=body, timeout=30) as r:
            for _ in r.iter_lines():
                if not started.is_set():
                    started.set()
                    samples = scrape(stack.url)
                    seen["running"] = value(samples, "vllm:num_requests_running")
                    seen["kv"] = value(samples, "vllm:kv_cache_usage_perc")
                    return  # disconnect: the request is aborted

    t = threading.Thread(target=watch)
    t.start()
    t.join(30)
    assert seen["running"] == 1 and 0 < seen["kv"] < 1
    assert stack.wait_idle() == 0.0
    assert value(scrape(stack.url), "vllm:num_requests_running") == 0
