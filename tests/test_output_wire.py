"""The compact form of outputs between the engine process and the front: every output the
engine makes comes back equal after encode -> pickle -> decode, with less sent each step."""

import pickle

import pytest

from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.engine.output_wire import OutputDecoder, OutputEncoder
from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams
from tests.engine_fixtures import tiny_model


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(tiny_model(seed=5), EngineConfig(max_model_len=96, max_num_seqs=8, max_num_batched_tokens=32,
                                                     page_size=4, num_pages=96, compilation_cache_dir="",
                                                     warmup=False))


def _fields(out: RequestOutput):
    # Compared by value: the engine's metrics object is one per request, mutated as it goes, so
    # it is read at the moment each output is made.
    m = out.metrics
    return (out.request_id, out.prompt, list(out.prompt_token_ids), out.outputs, out.finished, out.prompt_logprobs,
            out.extra, None if m is None else (m.arrival_time, m.first_scheduled_time, m.first_token_time,
                                               m.last_token_time, m.finished_time, m.num_preemptions,
                                               list(m.token_times)))


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
def test_round_trip_of_a_real_run(engine, kind):
    encoder, decoder = OutputEncoder(), OutputDecoder()
    prompts = [[5, 9, 33, 4], list(range(3, 30)), [200, 7]]
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=0.8 if i == 1 else 0.0, max_tokens=12 + i, ignore_eos=True, seed=i,
                                n=2 if i == 1 else 1, logprobs=2 if i == 2 else None,
                                prompt_logprobs=1 if i == 0 else None, output_kind=kind)
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    sizes = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        want = [_fields(o) for o in outs]
        data = pickle.dumps(encoder.encode(outs))
        sizes.append((len(data), len(pickle.dumps(outs))))
        assert [_fields(o) for o in decoder.decode(pickle.loads(data))] == want
    assert len(decoder) == 0 and not encoder._times_sent  # finished requests leave nothing behind
    # Deltas shrink most (cumulative outputs resend their tokens and text by definition).
    assert sum(s for s, _ in sizes) < sum(full for _, full in sizes) / (2 if kind == RequestOutputKind.DELTA else 1)


def test_metrics_are_one_object_per_request_extended_in_place():
    encoder, decoder = OutputEncoder(), OutputDecoder()
    m = RequestMetrics(arrival_time=1.0, token_times=[2.0])

    def out(text, finished=False):
        return RequestOutput("a", "hi", [1, 2], [CompletionOutput(0, text, [7])], finished, metrics=m)

    first = decoder.decode(pickle.loads(pickle.dumps(encoder.encode([out("x")]))))[0]
    m.token_times.append(3.0)
    m.first_token_time = 2.0
    msg = encoder.encode([out("y")])
    assert msg[0][1] is None and msg[0][5][-1] == [3.0]  # no prompt, only the new token time
    second = decoder.decode(msg)[0]
    assert second.metrics is first.metrics and second.metrics.token_times == [2.0, 3.0]
    assert second.prompt_token_ids == [1, 2] and second.metrics.first_token_time == 2.0


def test_aborted_requests_are_forgotten_and_unknown_ones_refused():
    encoder, decoder = OutputEncoder(), OutputDecoder()
    msg = encoder.encode([RequestOutput("a", None, [1], [CompletionOutput(0, "", [3])])])
    decoder.decode(msg)
    encoder.forget("a")
    decoder.forget("a")
    assert len(decoder) == 0 and not encoder._times_sent
    later = (("b", None, [(0, "", [3], None, None, None, None)], False, None, None, None),)
    with pytest.raises(RuntimeError, match="before its first"):
        decoder.decode(later)
