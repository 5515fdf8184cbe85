"""Engine features on a tiny model: n > 1, seeds, stop strings and ids, logprobs, aborts,
prefix caching, bad input, metrics, and the async front."""

import asyncio

import jax
import numpy as np
import pytest

from jaxinfer.engine.async_engine import AsyncLLMEngine
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.generate import generate, prefill_logits
from jaxinfer.sampling_params import SamplingParams
from tests.engine_fixtures import tiny_model


class ByteTokenizer:
    """Token id i is byte i: enough to exercise text, stop strings and multi-byte characters."""

    eos_token_ids = (2,)
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids):
        return [chr(i) for i in ids]


@pytest.fixture(scope="module")
def model():
    m = tiny_model(seed=5)
    m.tokenizer = ByteTokenizer()
    return m


@pytest.fixture(scope="module")
def engine(model):
    return LLMEngine(model, EngineConfig(max_model_len=96, max_num_seqs=8, max_num_batched_tokens=32, page_size=4,
                                         num_pages=128, compilation_cache_dir=""), kv_fill=float("nan"))


def run_all(engine, requests):
    """Adds (id, prompt, params) requests and steps until all finish; returns id -> output."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert engine.block_manager.usage == 0
    return done


PROMPT = [5, 17, 42, 99, 7, 250, 13, 64, 31]


def test_n_greedy_completions_share_prompt_and_match_reference(engine, model):
    [ref] = generate(model, [PROMPT], 20)
    out = run_all(engine, [("a", {"prompt_token_ids": PROMPT},
                            SamplingParams(n=3, temperature=0.0, max_tokens=20, ignore_eos=True))])["a"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == ref for c in out.outputs)


def test_seeded_sampling_is_independent_of_batch(engine):
    params = SamplingParams(temperature=1.0, top_k=40, max_tokens=16, seed=1234, ignore_eos=True)
    alone = run_all(engine, [("x", {"prompt_token_ids": PROMPT}, params)])["x"].outputs[0].token_ids
    crowd = [(f"o{i}", {"prompt_token_ids": PROMPT[i:] + [i + 3]},
              SamplingParams(temperature=0.7, top_p=0.8, seed=i, max_tokens=10 + i)) for i in range(5)]
    mixed = run_all(engine, crowd[:2] + [("x", {"prompt_token_ids": PROMPT}, params)] + crowd[2:])
    assert mixed["x"].outputs[0].token_ids == alone
    n2 = run_all(engine, [("y", {"prompt_token_ids": PROMPT}, params.clone(n=2))])["y"]
    assert n2.outputs[0].token_ids == alone and n2.outputs[1].token_ids != alone


def test_stop_string_and_stop_token(engine, model):
    [ref] = generate(model, [PROMPT], 30)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    full = run_all(engine, [("f", {"prompt_token_ids": PROMPT}, params)])["f"].outputs[0].text
    # Two printable characters of this model's greedy output: a stop string spanning two byte tokens.
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    c = run_all(engine, [("s", {"prompt_token_ids": PROMPT}, params.clone(stop=[stop, "never"]))])["s"].outputs[0]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.text == full[:full.index(stop)]
    assert c.token_ids == ref[:len(c.token_ids)] and len(c.token_ids) < 30
    kept = run_all(engine, [("k", {"prompt_token_ids": PROMPT},
                             params.clone(stop=stop, include_stop_str_in_output=True))])["k"].outputs[0]
    assert kept.text == full[:full.index(stop) + len(stop)]
    stop_id = ref[7]
    first = ref.index(stop_id)
    out = run_all(engine, [("t", {"prompt_token_ids": PROMPT},
                            SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_id],
                                           ignore_eos=True))])["t"].outputs[0]
    assert out.token_ids == ref[:first + 1] and (out.finish_reason, out.stop_reason) == ("stop", stop_id)


def test_logprobs_match_reference(engine, model):
    out = run_all(engine, [("l", {"prompt_token_ids": PROMPT},
                            SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True))])["l"]
    c = out.outputs[0]
    full = PROMPT + c.token_ids
    logits = prefill_logits(model, full)
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for i, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(PROMPT) - 1 + i]
        top = np.argsort(-row)[:3]
        assert set(entry) == set(top.tolist()) | {tok}
        for t, lp in entry.items():
            assert abs(lp.logprob - row[t]) < 1e-4
            assert lp.rank == np.sum(row >= row[t])  # exact rank, for the sampled token too


def test_bad_requests_leave_running_ones_unchanged(engine, model):
    [ref] = generate(model, [PROMPT], 12)
    engine.add_request("ok", {"prompt_token_ids": PROMPT}, SamplingParams(temperature=0.0, max_tokens=12,
                                                                          ignore_eos=True))
    engine.step()
    bad = [({"prompt_token_ids": list(range(3, 99))}, SamplingParams(), "max_model_len"),
           ({"prompt_token_ids": []}, SamplingParams(), "empty"),
           ({"prompt_token_ids": [5, 100000]}, SamplingParams(), "not an integer in"),
           ({"prompt_token_ids": [5, -1]}, SamplingParams(), "not an integer in"),
           ({"foo": 1}, SamplingParams(), "needs 'prompt'"),
           ({"prompt_token_ids": [5]}, SamplingParams(logit_bias={10**6: 1.0}), "outside the vocabulary"),
           ("text prompt", "not params", "SamplingParams")]
    for prompt, params, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.add_request("bad", prompt, params)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", {"prompt_token_ids": PROMPT})
    out = run_all(engine, [])
    assert out["ok"].outputs[0].token_ids == ref


def test_abort_frees_pages(engine):
    engine.add_request("gone", {"prompt_token_ids": PROMPT * 3}, SamplingParams(max_tokens=50, n=2, ignore_eos=True))
    engine.add_request("kept", {"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=5, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.usage > 0
    aborted = engine.metrics.snapshot().request_success_total.get("abort", 0)
    engine.abort_request("gone")
    engine.abort_request("gone")  # twice, or unknown: a no-op
    out = run_all(engine, [])
    assert set(out) == {"kept"}
    engine.step()  # an idle step still tells the runner which requests ended
    assert engine.runner.num_cached_requests == 0
    assert engine.metrics.snapshot().request_success_total["abort"] == aborted + 1


def test_prefix_caching_keeps_outputs(model):
    engine = LLMEngine(model, EngineConfig(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=16,
                                           page_size=4, num_pages=64, enable_prefix_caching=True,
                                           compilation_cache_dir=""), kv_fill=float("nan"))
    shared = PROMPT * 3
    prompts = [shared + [i + 3, i + 4] for i in range(4)]
    refs = generate(model, prompts, 8)
    for i, p in enumerate(prompts):  # one by one, so later ones hit the cached prefix
        out = run_all(engine, [(str(i), {"prompt_token_ids": p},
                                SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))])
        assert out[str(i)].outputs[0].token_ids == refs[i]
    assert engine.block_manager.prefix_hit_rate > 0.5
    m = engine.metrics.snapshot()
    assert m.prefix_cache_hits_total / m.prefix_cache_queries_total == engine.block_manager.prefix_hit_rate
    # Prompt logprobs score every prompt position, so such a request takes no cached prefix.
    out = run_all(engine, [("lp", {"prompt_token_ids": prompts[0]},
                            SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=0, ignore_eos=True))])["lp"]
    assert out.outputs[0].token_ids == refs[0]
    assert len(out.prompt_logprobs) == len(prompts[0]) and all(e is not None for e in out.prompt_logprobs[1:])


def test_metrics_move(engine):
    before = engine.metrics.snapshot()
    out = run_all(engine, [("m", {"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=6, ignore_eos=True))])["m"]
    after = engine.metrics.snapshot()
    m = out.metrics
    assert len(m.token_times) == 6 and len(m.inter_token_latencies) == 5
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time == m.token_times[0] <= m.finished_time
    assert after.generation_tokens_total - before.generation_tokens_total == 6
    # Prefix caching is on (the default): the prompt is looked up once, and counted whole as
    # vLLM counts it, whatever part of it was found cached.
    assert after.prefix_cache_queries_total - before.prefix_cache_queries_total == len(PROMPT)
    assert after.prompt_tokens_total - before.prompt_tokens_total == len(PROMPT)
    assert after.time_to_first_token_seconds.count == before.time_to_first_token_seconds.count + 1
    assert after.inter_token_latency_seconds.count == before.inter_token_latency_seconds.count + 5
    assert after.request_success_total["length"] == before.request_success_total.get("length", 0) + 1


def test_async_streams_and_disconnect(engine, model):
    [ref] = generate(model, [PROMPT], 10)
    front = AsyncLLMEngine(engine)

    async def consume(rid, max_tokens, stop_after=None):
        got = []
        gen = front.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                          ignore_eos=True), rid)
        async for out in gen:
            got.append(out)
            if stop_after is not None and len(got) >= stop_after:
                await gen.aclose()  # what a disconnecting client does
                break
        return got

    async def main():
        full, cut = await asyncio.gather(consume("full", 10), consume("cut", 60, stop_after=2))
        with pytest.raises(ValueError, match="empty"):
            async for _ in front.generate({"prompt_token_ids": []}, SamplingParams(), "bad"):
                pass
        usage = await front.call(lambda e: (e.block_manager.usage, e.has_unfinished_requests()))
        for _ in range(50):
            if usage == (0, False):
                break
            await asyncio.sleep(0.05)
            usage = await front.call(lambda e: (e.block_manager.usage, e.has_unfinished_requests()))
        return full, cut, usage

    try:
        full, cut, usage = asyncio.run(main())
    finally:
        front.shutdown()
    assert full[-1].finished and full[-1].outputs[0].token_ids == ref
    assert len(full) == 10 and len(cut) == 2 and not cut[-1].finished
    assert usage == (0, False)


def test_a_slow_consumer_gets_what_queued_in_one_output(engine, model):
    """A consumer that reads slower than the engine steps gets the deltas queued meanwhile merged
    (tokens, text and logprobs in order), or the latest cumulative output: nothing is lost and
    nothing repeats."""
    from jaxinfer.sampling_params import RequestOutputKind

    [ref] = generate(model, [PROMPT], 24)
    front = AsyncLLMEngine(engine)

    async def consume(rid, kind):
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1, output_kind=kind)
        got = []
        async for out in front.generate({"prompt_token_ids": PROMPT}, params, rid):
            got.append(out)
            await asyncio.sleep(0.15)  # several engine steps pass before the next read
        return got

    async def main():
        return await asyncio.gather(consume("delta", RequestOutputKind.DELTA),
                                    consume("cumulative", RequestOutputKind.CUMULATIVE))

    try:
        delta, cumulative = asyncio.run(main())
    finally:
        front.shutdown()
    tokens = [t for out in delta for t in out.outputs[0].token_ids]
    assert tokens == ref and delta[-1].finished and not any(o.finished for o in delta[:-1])
    assert max(len(o.outputs[0].token_ids) for o in delta) > 1  # some outputs were merged
    assert "".join(o.outputs[0].text for o in delta) == model.tokenizer.decode(ref)
    logprobs = [lp for out in delta for lp in out.outputs[0].logprobs]
    assert len(logprobs) == len(ref) and all(tok in d for d, tok in zip(logprobs, ref))
    assert cumulative[-1].outputs[0].token_ids == ref and len(cumulative) < len(ref)
    lengths = [len(o.outputs[0].token_ids) for o in cumulative]
    assert lengths == sorted(set(lengths))  # each read is newer than the last


def test_merge_deltas_concatenates_each_completion():
    from jaxinfer.outputs import CompletionOutput, RequestOutput, merge_deltas

    a = RequestOutput("r", None, [1], [CompletionOutput(0, "ab", [3, 4], logprobs=[{3: 0.1}, {4: 0.2}]),
                                       CompletionOutput(1, "x", [9])], prompt_logprobs=[None],
                      extra={"k": 1})
    b = RequestOutput("r", None, [1], [CompletionOutput(0, "c", [5], finish_reason="length", logprobs=[{5: 0.3}]),
                                       CompletionOutput(2, "z", [8])], finished=True, extra={"j": 2})
    m = merge_deltas(a, b)
    assert m.finished and m.prompt_logprobs == [None] and m.extra == {"k": 1, "j": 2}
    by_index = {c.index: c for c in m.outputs}
    assert (by_index[0].text, by_index[0].token_ids, by_index[0].finish_reason) == ("abc", [3, 4, 5], "length")
    assert by_index[0].logprobs == [{3: 0.1}, {4: 0.2}, {5: 0.3}]
    assert by_index[1].token_ids == [9] and by_index[2].token_ids == [8]


@pytest.fixture(scope="module")
def small_score_chunk_engine(model):
    """Prompt logprobs scored 12 rows at a time: several chunks per step, the last one padded."""
    from jaxinfer.engine import runner

    patch = pytest.MonkeyPatch()
    patch.setattr(runner, "SCORE_CHUNK", 12)
    try:  # the constant is read when the engine's programs are traced: at its warm-up
        yield LLMEngine(model, EngineConfig(max_model_len=96, max_num_seqs=8, max_num_batched_tokens=32,
                                            page_size=4, num_pages=128, compilation_cache_dir=""))
    finally:
        patch.undo()


@pytest.mark.parametrize("which", ["engine", "small_score_chunk_engine"])
def test_prompt_logprobs_match_reference(which, model, request):
    engine = request.getfixturevalue(which)
    prompt = PROMPT * 5  # 45 tokens over a 32-token budget: scored across two steps
    out = run_all(engine, [("p", {"prompt_token_ids": prompt},
                            SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2, n=2))])["p"]
    ref = np.asarray(jax.nn.log_softmax(prefill_logits(model, prompt), axis=-1))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry, row = out.prompt_logprobs[pos], ref[pos - 1]
        assert set(entry) == set(np.argsort(-row)[:2].tolist()) | {prompt[pos]}
        for t, lp in entry.items():
            assert abs(lp.logprob - row[t]) < 1e-4
            assert lp.rank == np.sum(row >= row[t])
