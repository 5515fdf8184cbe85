"""The engine in its own process: the same streams, errors and aborts as the in-thread front."""

import asyncio
import os

import numpy as np
import pytest

from jaxinfer.engine.async_engine import EngineDeadError
from jaxinfer.engine.core_process import AsyncEngineCore
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams


def _tiny_engine():
    """Runs in the child: the engine over the tiny test model (module-level, so picklable)."""
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import LLMEngine
    from tests.engine_fixtures import tiny_model

    return LLMEngine(tiny_model(seed=3), EngineConfig(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=32,
                                                      page_size=4, num_pages=64, compilation_cache_dir="",
                                                      warmup=False))


def _failing_engine():
    raise ValueError("no such model")


def _num_unfinished(engine):
    return engine.num_unfinished_requests


def _exit_process(engine):
    os._exit(3)


@pytest.fixture(scope="module")
def core():
    front = AsyncEngineCore(_tiny_engine)
    yield front
    front.shutdown()


async def _collect(front, rid, prompt, params):
    outs = [o async for o in front.generate({"prompt_token_ids": prompt}, params, rid)]
    assert outs[-1].finished
    return outs


def test_streams_match_the_reference(core):
    from jaxinfer.generate import generate
    from tests.engine_fixtures import tiny_model

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, n).tolist() for n in (3, 17, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def main():
        return await asyncio.gather(*(_collect(core, f"r{i}", p, params) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    reference = generate(tiny_model(seed=3), prompts, 8)
    for outs, ref in zip(results, reference):
        assert [t for o in outs for t in o.outputs[0].token_ids] == ref  # deltas add up
    assert core.engine.max_model_len == 96 and core.engine.model_config.vocab_size > 0
    assert asyncio.run(core.call(_num_unfinished)) == 0


def test_bad_requests_and_aborts(core):
    async def main():
        with pytest.raises(ValueError, match="outside the vocabulary|not an integer"):
            await _collect(core, "bad", [10**9], SamplingParams(max_tokens=2))
        stream = core.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=80, ignore_eos=True), "long")
        first = await stream.__anext__()
        await core.abort("long")
        rest = [o async for o in stream]
        return first, rest

    first, rest = asyncio.run(main())
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert asyncio.run(core.call(_num_unfinished)) == 0


def test_a_dead_engine_fails_what_is_in_flight():
    front = AsyncEngineCore(_tiny_engine)
    try:
        async def main():
            stream = front.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=500, ignore_eos=True), "a")
            await stream.__anext__()
            with pytest.raises(EngineDeadError):
                await front.call(_exit_process)
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass

        asyncio.run(main())
        with pytest.raises(EngineDeadError):
            asyncio.run(_collect(front, "b", [5], SamplingParams(max_tokens=2)))
    finally:
        front.shutdown()


def test_a_failed_start_says_why():
    with pytest.raises(RuntimeError, match="no such model"):
        AsyncEngineCore(_failing_engine)


def test_the_server_over_an_engine_process(core):
    """The OpenAI app over the process front: completions, health and metrics."""
    from fastapi.testclient import TestClient

    from jaxinfer.generate import generate
    from jaxinfer.server.app import create_app
    from tests.engine_fixtures import tiny_model

    with TestClient(create_app(core)) as client:
        r = client.post("/v1/completions", json={"model": "jaxinfer", "prompt": [5, 6, 7],
                                                 "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        assert client.get("/health").status_code == 200
        metrics = client.get("/metrics").text
        assert "num_requests_running" in metrics and "generation_tokens" in metrics
    [ref] = generate(tiny_model(seed=3), [[5, 6, 7]], 5)
    r = asyncio.run(_collect(core, "again", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=5,
                                                                       ignore_eos=True)))
    assert r[-1].outputs[0].token_ids == ref


def _unpicklable(engine):
    import threading

    return threading.Lock()


def test_a_reply_that_cannot_be_pickled_is_an_error_not_a_hang(core):
    with pytest.raises(TypeError, match="cannot be pickled"):
        asyncio.run(core.call(_unpicklable))
    assert asyncio.run(core.call(_num_unfinished)) == 0


def test_a_reply_this_side_cannot_take_fails_the_streams_instead_of_hanging():
    """Outputs that do not decode (here: of a request never announced) end every stream and
    command with an error; the reader thread does not die silently."""
    import pickle as pickle_

    front = AsyncEngineCore(_tiny_engine)
    try:
        bad = (("ghost", None, [(0, "", [1], None, None, None, None)], False, None, None, None),)
        front._replies.put(pickle_.dumps(("outputs", None, bad, None)))
        front._thread.join(10)
        assert not front._thread.is_alive()
        with pytest.raises(EngineDeadError, match="replies failed"):
            asyncio.run(_collect(front, "after", [5, 6], SamplingParams(max_tokens=2)))
    finally:
        front.shutdown()
