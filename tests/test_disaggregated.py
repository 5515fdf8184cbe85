"""Prefill-decode disaggregation (engine/disaggregated.py): a prefill engine and a decode engine
on their own devices give the outputs of one engine, and the prompt pages really move (the
decode engine finds them in its host tier instead of computing them). The runs need several
simulated CPU devices, so they happen in a subprocess (this process started JAX with one)."""

from __future__ import annotations

import jax
import pytest

from jaxinfer.engine.config import EngineConfig
from tests.test_data_parallel import SMALL, run_in_subprocess

# Lengths around the 8-token page: under one page, exactly one, one and a bit, several pages and
# a partial one, and a prompt that repeats another's first pages (its pages move only once).
PROMPTS = [list(range(3, 6)), list(range(10, 18)), list(range(20, 29)), list(range(30, 63)),
           list(range(70, 110)), list(range(30, 55)) + [1, 2]]


def _run(engine, prompts, params):
    """Token ids of each prompt's final output, by prompt."""
    last = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"q{i}", {"prompt_token_ids": p}, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            last[out.request_id] = out
    return [list(last[f"q{i}"].outputs[0].token_ids) for i in range(len(prompts))]


def _pd_main(checkpoint: str):
    """In the subprocess: one engine, then the disaggregated pair on devices 0 and 1."""
    from jaxinfer.engine.disaggregated import DisaggregatedEngine
    from jaxinfer.engine.engine import LLMEngine
    from jaxinfer.loading.loader import load_model
    from jaxinfer.sampling_params import SamplingParams

    config = EngineConfig(**SMALL)
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=10)
    one = LLMEngine(load_model(checkpoint), config)
    want = [_run(one, PROMPTS, p) for p in (greedy, sampled)]

    pd = DisaggregatedEngine(load_model(checkpoint), config)
    devices = jax.devices()
    assert {leaf.devices().pop() for leaf in jax.tree.leaves(pd.prefill.runner.params)} == {devices[0]}
    assert {leaf.devices().pop() for leaf in jax.tree.leaves(pd.decode.runner.params)} == {devices[1]}
    got = [_run(pd, PROMPTS, p) for p in (greedy, sampled)]
    assert got == want, (got, want)
    # Every full page before each prompt's last token moved once: the first round moves them,
    # the second round's prompts are found on the decode engine's device (or already in its tier).
    page = config.page_size
    distinct = {tuple(p[:(len(p) - 1) // page * page]) for p in PROMPTS}
    shared_prefix = 3  # PROMPTS[5] repeats PROMPTS[3]'s first 3 pages
    assert pd.num_transferred_pages == sum(len(p) // page for p in distinct) - shared_prefix
    # The decode engine's copies of the moved pages hold the prefill engine's bytes, page by page.
    import numpy as np

    for p in PROMPTS:
        hashes = pd.decode.block_manager.hash_blocks(p)[:(len(p) - 1) // page]
        src = pd.prefill.block_manager.cached_device_pages(hashes)
        dst = pd.decode.block_manager.cached_device_pages(hashes)
        assert len(src) == len(dst) == len(hashes)
        for a, b in zip(pd.prefill.runner.kv_cache, pd.decode.runner.kv_cache):  # k and v pools
            np.testing.assert_array_equal(np.asarray(a)[:, :, src], np.asarray(b)[:, :, dst])
    hits = pd.decode.metrics.external_prefix_cache_hits_total
    assert hits >= pd.num_transferred_pages * page, hits
    # The export's warm-up compiles every program a hand-over runs, and the export moves exactly
    # the cached pages (11 full pages: transfers of 8, 1, 1 and 1).
    from jaxinfer.engine.compile_counter import CompileCounter

    long = list(range(200, 290))
    pd.prefill.add_request("export-check", {"prompt_token_ids": long}, SamplingParams(temperature=0.0, max_tokens=1))
    while pd.prefill.has_unfinished_requests():
        pd.prefill.step()
    hashes = pd.prefill.block_manager.hash_blocks(long)[:(len(long) - 1) // page]
    pages = pd.prefill.block_manager.cached_device_pages(hashes)
    pd.warm_export()
    with CompileCounter() as counter:
        moved, rows = pd._export(hashes)
    assert counter.count == 0, "an export compiled after its warm-up"
    assert moved == hashes and rows.shape[0] == len(pages) == 11
    for i, pool in enumerate(pd.prefill.runner.kv_cache):
        np.testing.assert_array_equal(rows[:, i], np.asarray(pool)[:, :, pages].transpose(2, 0, 1, 3, 4))
    print("outputs equal, pages moved", pd.num_transferred_pages, flush=True)

    # A request the decode engine would refuse is refused up front, and nothing is queued.
    with pytest.raises(ValueError, match="logit_bias"):
        pd.add_request("bad", {"prompt_token_ids": [1, 2]}, SamplingParams(logit_bias={10**6: 1.0}))
    assert not pd.has_unfinished_requests()
    # Aborts reach the request in either engine.
    pd.add_request("a", {"prompt_token_ids": PROMPTS[3]}, greedy)
    pd.add_request("b", {"prompt_token_ids": PROMPTS[4]}, greedy)
    with pytest.raises(ValueError, match="already in use"):
        pd.add_request("a", {"prompt_token_ids": [1]}, greedy)
    pd.step()  # both prefilled (the step budget holds them) and handed over
    assert pd.decode.num_unfinished_requests == 2
    pd.abort_request("a")
    pd.add_request("c", {"prompt_token_ids": PROMPTS[0]}, greedy)
    pd.abort_request("c")  # still on the prefill side
    finished = {}
    while pd.has_unfinished_requests():
        for out in pd.step():
            finished[out.request_id] = out
    assert set(finished) == {"b"} and finished["b"].outputs[0].token_ids == want[0][4]
    print("aborts ok", flush=True)

    # Through `LLM` (as the CLI's --disaggregate-prefill builds it).
    from jaxinfer import LLM

    llm = LLM(checkpoint, disaggregate_prefill=True, **SMALL)
    assert isinstance(llm.engine, DisaggregatedEngine)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == want[0]
    print("LLM ok", flush=True)

    # Through the server's front (AsyncLLMEngine, as `jaxinfer serve` runs it), streamed.
    import asyncio

    from jaxinfer.engine.async_engine import AsyncLLMEngine
    from tests.server_fake import asgi_client

    front = AsyncLLMEngine(llm.engine)

    async def stream_one():
        async with asgi_client(front) as client:
            body = {"model": "fake", "prompt": PROMPTS[3], "max_tokens": 10, "temperature": 0, "stream": True,
                    "logprobs": 1}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                return [line async for line in r.aiter_lines() if line.startswith("data: {")]

    events = asyncio.run(stream_one())
    front.shutdown()
    import json as _json
    tokens = [t for e in events for c in _json.loads(e[6:])["choices"] for t in (c["logprobs"] or {}).get("tokens", [])]
    assert len(tokens) == 10, events
    text = "".join(c["text"] for e in events for c in _json.loads(e[6:])["choices"])
    assert text == llm.get_tokenizer().decode(want[0][3]), (text, want[0][3])
    print("server ok", flush=True)


def test_prefill_and_decode_engines_give_one_engines_outputs(tmp_path):
    from tests.server_fixtures import write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "ckpt", seed=5)
    out = run_in_subprocess(f"from tests.test_disaggregated import _pd_main; _pd_main({str(checkpoint)!r})")
    assert "aborts ok" in out.splitlines() and "server ok" in out.splitlines(), out


def test_settings_it_cannot_serve_are_refused():
    from jaxinfer.engine.disaggregated import DisaggregatedEngine

    with pytest.raises(ValueError, match="enable_prefix_caching"):
        DisaggregatedEngine(None, EngineConfig(enable_prefix_caching=False))
    with pytest.raises(ValueError, match="different devices"):
        DisaggregatedEngine(None, EngineConfig(), prefill_devices=jax.devices()[:1],
                            decode_devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="needs 2 devices .* but only 1 are visible"):
        DisaggregatedEngine(None, EngineConfig())  # this process sees one device
    with pytest.raises(ValueError, match="data_parallel_size must be 1"):
        DisaggregatedEngine(None, EngineConfig(data_parallel_size=2), prefill_devices=jax.devices()[:1],
                            decode_devices=[])
