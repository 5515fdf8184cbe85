"""The exact response cache: a repeat of a deterministic request is answered from it (the
same completions, no step run for it), a changed seed or an unseeded sampled request is not,
and the cache stays within its size."""

import pytest

from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.engine.response_cache import ResponseCache
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams
from tests.engine_fixtures import tiny_model

PROMPT = [5, 17, 29, 41, 53]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


def _engine(model, **kw):
    cfg = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, page_size=4, num_pages=64,
               compilation_cache_dir="", warmup=False, response_cache_size=2)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg))


def _generate(engine, rid, params, prompt=PROMPT):
    """Runs one request to the end; its outputs (the last one final) and the tokens the engine
    computed for it."""
    before = engine.metrics.generation_tokens_total
    engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs, engine.metrics.generation_tokens_total - before


def test_repeat_is_answered_from_the_cache(model):
    engine = _engine(model)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2, n=2)
    *_, first = (outs := _generate(engine, "a", params))[0]
    computed = outs[1]
    assert computed == 24
    assert (engine.metrics.response_cache_queries_total, engine.metrics.response_cache_hits_total) == (1, 0)
    # Streamed differently, but the same request: one output with everything, nothing computed.
    [again], computed = _generate(engine, "b", params.clone(output_kind=RequestOutputKind.DELTA))
    assert computed == 0
    assert again.finished and again.request_id == "b"
    assert [(c.token_ids, c.logprobs, c.finish_reason) for c in again.outputs] == \
        [(c.token_ids, c.logprobs, c.finish_reason) for c in first.outputs]
    assert (engine.metrics.response_cache_queries_total, engine.metrics.response_cache_hits_total) == (2, 1)
    # The replayed output is a copy: changing it does not change the cache.
    again.outputs[0].token_ids.append(-1)
    third = _generate(engine, "c", params)[0][-1]
    assert third.outputs[0].token_ids == first.outputs[0].token_ids


def test_seeds_decide_what_is_cached(model):
    engine = _engine(model)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    a = _generate(engine, "a", seeded)[0][-1]
    [b], computed = _generate(engine, "b", seeded)
    assert computed == 0 and b.outputs[0].token_ids == a.outputs[0].token_ids
    _, computed = _generate(engine, "c", seeded.clone(seed=8))  # another seed: computed
    assert computed == 8
    unseeded = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    queries = engine.metrics.response_cache_queries_total
    for rid in ("d", "e"):  # never looked up, never stored
        _, computed = _generate(engine, rid, unseeded)
        assert computed == 8
    assert engine.metrics.response_cache_queries_total == queries
    # A greedy request ignores its seed: seeds 1 and 2 share one entry.
    _generate(engine, "f", SamplingParams(temperature=0.0, seed=1, max_tokens=4))
    _, computed = _generate(engine, "g", SamplingParams(temperature=0.0, seed=2, max_tokens=4))
    assert computed == 0


def test_least_recently_used_entries_leave_first(model):
    engine = _engine(model)
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for rid, prompt in (("a", [3, 4]), ("b", [5, 6]), ("c", [7, 8])):  # "a" leaves the 2-entry cache
        _generate(engine, rid, greedy, prompt)
    assert len(engine.response_cache) == 2
    assert _generate(engine, "c2", greedy, [7, 8])[1] == 0
    assert _generate(engine, "a2", greedy, [3, 4])[1] == 4


def test_replayed_request_can_be_aborted_and_ids_stay_unique(model):
    engine = _engine(model)
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    _generate(engine, "a", greedy)
    engine.add_request("b", {"prompt_token_ids": PROMPT}, greedy)
    assert engine.has_unfinished_requests() and engine.num_unfinished_requests == 1
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("b", {"prompt_token_ids": PROMPT}, greedy)
    engine.abort_request("b")
    assert not engine.has_unfinished_requests() and engine.step() == []


def test_off_by_default_and_bad_sizes(model):
    assert LLMEngine(model, EngineConfig(num_pages=16, warmup=False, compilation_cache_dir="")).response_cache is None
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="response_cache_size"):
            EngineConfig(response_cache_size=bad)
    with pytest.raises(ValueError, match="at least one entry"):
        ResponseCache(0)


def test_metrics_render_under_jaxinfer_only(model):
    from jaxinfer.server.metrics import MetricsRenderer, sample_engine

    engine = _engine(model)
    greedy = SamplingParams(temperature=0.0, max_tokens=3)
    _generate(engine, "a", greedy)
    _generate(engine, "b", greedy)
    text = MetricsRenderer("m").render(sample_engine(engine)).decode()
    assert 'jaxinfer:response_cache_hits_total{model_name="m"} 1.0' in text
    assert 'jaxinfer:response_cache_queries_total{model_name="m"} 2.0' in text
    assert "vllm:response_cache" not in text
