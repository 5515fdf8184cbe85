"""Asynchronous scheduling: step N+1 is planned and queued while step N runs, its decode input
ids read from step N's device output, and the host learns tokens one step late.

Every check compares the asynchronous engine with the synchronous one (or the reference loop):
the same tokens under random arrivals and forced preemption, the same seeded samples, stops
at the same token with the overshoot dropped, and penalties (whose histories live on the
device) with a step still queued.
"""

import numpy as np
import pytest

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.engine.request import Request
from jaxinfer.engine.scheduler import Scheduler, SchedulerConfig
from jaxinfer.engine.sampling import SamplingRow
from jaxinfer.generate import generate, prefill_logits
from jaxinfer.sampling_params import SamplingParams
from tests.engine_fixtures import tiny_model
from tests.test_sampling import ref_process


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=7)


def _engine(model, async_scheduling, **kw):
    cfg = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, page_size=4, num_pages=64,
               compilation_cache_dir="", warmup=False, async_scheduling=async_scheduling)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg), kv_fill=float("nan"))


def _run(engine, requests, arrivals=None):
    """Adds requests at their arrival steps and steps until all finish; id -> CompletionOutput."""
    arrivals = arrivals or [0] * len(requests)
    pending = sorted(range(len(requests)), key=lambda i: arrivals[i])
    done, step = {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and arrivals[pending[0]] <= step:
            rid, prompt, params = requests[pending.pop(0)]
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
        step += 1
        assert step < 5000
    assert engine.block_manager.usage == 0
    return done


def test_random_arrivals_and_preemption_match_reference(model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, int(rng.integers(1, 50))).tolist() for _ in range(16)]
    max_tokens = [int(rng.integers(1, 40)) for _ in prompts]
    arrivals = [int(rng.integers(0, 30)) for _ in prompts]
    requests = [(str(i), p, SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
                for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    engine = _engine(model, True, num_pages=33)  # too few pages for 8 sequences: preemption
    done = _run(engine, requests, arrivals)
    assert engine.scheduler.num_preemptions_total > 0
    for i, p in enumerate(prompts):
        [ref] = generate(model, [p], max_tokens[i])
        assert done[str(i)].token_ids == ref


def test_the_next_step_is_queued_before_the_tokens_are_read(model):
    engine = _engine(model, True)
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0.0, max_tokens=6))
    assert engine.step() == []  # the prefill is queued; nothing read yet
    assert engine._in_flight is not None
    outs = engine.step()  # the first decode is queued with its input id on the device; the prefill's token read
    assert [len(o.outputs[0].token_ids) for o in outs] == [1]
    assert engine.runner._prev_rows == {"a": 0}
    assert engine.scheduler.get_request("a").num_output_placeholders == 1


@pytest.mark.parametrize("features", ["seeded", "min_tokens", "penalties", "logprobs"])
def test_sampling_features_match_synchronous(model, features):
    params = {
        "seeded": SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_tokens=20, ignore_eos=True),
        "min_tokens": SamplingParams(temperature=0.0, min_tokens=12, max_tokens=20),
        "penalties": SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=20,
                                    ignore_eos=True),
        "logprobs": SamplingParams(temperature=0.7, seed=3, logprobs=3, max_tokens=12, ignore_eos=True),
    }[features]
    prompts = [[9, 8, 7, 6], list(range(20, 45)), [100]]
    requests = [(str(i), p, params.clone(seed=params.seed + i) if params.seed is not None else params)
                for i, p in enumerate(prompts)]
    sync = _run(_engine(model, False), requests)
    asyn = _run(_engine(model, True), requests)
    for i in range(len(prompts)):
        assert asyn[str(i)].token_ids == sync[str(i)].token_ids
        assert asyn[str(i)].finish_reason == sync[str(i)].finish_reason
        if features == "logprobs":
            assert asyn[str(i)].logprobs == sync[str(i)].logprobs


def test_penalties_stay_asynchronous_under_preemption_and_match_reference(model):
    """Penalty histories live on the device: steps stay queued, preempted requests lose their
    slots to others and get their histories rewritten, and every greedy token is the argmax
    of the NumPy reference's penalized logits."""
    rng = np.random.default_rng(5)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=0.3,
                            max_tokens=16, ignore_eos=True)
    prompts = [rng.integers(3, 40, int(rng.integers(10, 30))).tolist() for _ in range(6)]
    # Two ~45-token sequences do not fit 64 tokens of KV; later requests come first: preemption,
    # and new requests sample while preempted ones hold penalty slots.
    engine = _engine(model, True, max_num_seqs=2, num_pages=17, max_model_len=64, scheduling_policy="priority")
    engine.add_request("probe", {"prompt_token_ids": [4, 5]}, params.clone(max_tokens=3))
    engine.step()
    assert engine._in_flight is not None  # penalties no longer force one step at a time
    engine.abort_request("probe")
    done, step = {}, 0
    while len(done) < len(prompts):
        if step % 6 == 0 and step // 6 < len(prompts):
            i = step // 6
            engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, params, priority=-i)
        done.update((o.request_id, o.outputs[0]) for o in engine.step() if o.finished)
        step += 1
        assert step < 2000
    assert engine.scheduler.num_preemptions_total > 0
    assert engine.runner._penalties.num_evictions > 0, "preempted requests were meant to lose their slots"
    checked = 0
    for i, prompt in enumerate(prompts):
        out = done[str(i)].token_ids
        logits = prefill_logits(model, prompt + out)
        for k, token in enumerate(out):
            want = ref_process(logits[len(prompt) + k - 1], SamplingRow(params, prompt, out[:k]))
            top2 = np.sort(want)[-2:]
            if top2[1] - top2[0] > 1e-3:  # a clear winner: the engine must have picked it
                assert token == np.argmax(want), f"request {i}, output {k}"
                checked += 1
    assert checked > 0.9 * sum(len(done[str(i)].token_ids) for i in range(len(prompts)))


def test_stop_token_ends_exactly_and_the_overshoot_is_dropped(model):
    [ref] = generate(model, [[11, 12, 13]], 24)
    stop_id = ref[9]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id], ignore_eos=True)
    engine = _engine(model, True)
    out = _run(engine, [("s", [11, 12, 13], params)])["s"]
    assert out.token_ids == ref[:ref.index(stop_id) + 1] and out.finish_reason == "stop"
    # The step queued after the stop token computed one more token for it; the next request
    # runs unaffected by that discarded work.
    again = _run(engine, [("t", [11, 12, 13], params)])["t"]
    assert again.token_ids == out.token_ids


def test_scheduler_keeps_one_placeholder_per_request_in_flight():
    bm = BlockManager(num_pages=32, page_size=4)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, page_size=4,
                                  max_steps_in_flight=2), bm)
    s.add_request(Request("r", [1, 2, 3], max_tokens=3))
    first = s.schedule()  # the prompt
    second = s.schedule()  # its first decode, planned before the prompt's token is known
    assert second.num_scheduled_tokens == {"r": 1} and second.sampling_req_ids == ("r",)
    assert s.get_request("r").num_output_placeholders == 2
    with pytest.raises(RuntimeError):
        s.schedule()  # two steps in flight at most
    s.update_from_output(first, {"r": [7]})
    third = s.schedule()  # the third token: the last max_tokens allows
    assert third.num_scheduled_tokens == {"r": 1}
    s.update_from_output(second, {"r": [8]})
    assert s.schedule().is_empty  # max_tokens is reached by the token in flight: nothing more
    s.update_from_output(third, {"r": [9]})
    assert not s.has_unfinished_requests()
    with pytest.raises(ValueError, match="max_steps_in_flight"):
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=1, max_model_len=8, page_size=4,
                        max_steps_in_flight=3)
