"""The engine end to end on a tiny model: batched outputs equal the reference loop run alone."""

import numpy as np
import pytest

from jaxinfer.engine.compile_counter import CompileCounter
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.generate import generate
from jaxinfer.sampling_params import SamplingParams
from tests.engine_fixtures import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _engine(model, **kw):
    cfg = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, page_size=4, num_pages=64,
               compilation_cache_dir="", warmup=True)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg), kv_fill=float("nan"))


def test_random_arrivals_with_preemption_match_reference(model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.config.vocab_size, int(rng.integers(1, 60))).tolist() for _ in range(24)]
    max_tokens = [int(rng.integers(1, 40)) for _ in prompts]
    arrivals = sorted(int(rng.integers(0, 40)) for _ in prompts)
    # 40 usable pages of 4 tokens cannot hold 8 running sequences of up to ~100 tokens: preemption.
    engine = _engine(model, num_pages=41)
    done, step, preemptions = {}, 0, {}
    pending = list(range(len(prompts)))
    while pending or engine.has_unfinished_requests():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            engine.add_request(str(i), {"prompt_token_ids": prompts[i]},
                               SamplingParams(temperature=0.0, max_tokens=max_tokens[i], ignore_eos=True))
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0]
                preemptions[out.request_id] = out.metrics
        step += 1
        assert step < 5000
    assert engine.scheduler.num_preemptions_total > 0, "the pool was meant to force preemption"
    # Each request's output reports its own preemptions, and they add up to the scheduler's count.
    assert sum(m.num_preemptions for m in preemptions.values()) == engine.scheduler.num_preemptions_total
    assert engine.block_manager.usage == 0
    for i, p in enumerate(prompts):
        [ref] = generate(model, [p], max_tokens[i])
        assert done[i].token_ids == ref, _divergence(model, p, ref, done[i].token_ids)
        assert done[i].finish_reason == "length"


def _divergence(model, prompt, ref, got):
    """Where two greedy runs part, and the reference's top-2 logit margin there."""
    from jaxinfer.generate import prefill_logits

    k = next(j for j, (a, b) in enumerate(zip(ref, got)) if a != b)
    row = np.sort(prefill_logits(model, prompt + ref[:k])[-1])
    return f"prompt of {len(prompt)} tokens: tokens differ at output {k}, reference margin {row[-1] - row[-2]:.3g}"


def _feature_params(rng, i: int) -> dict:
    """Sampling parameters cycling through every feature the sampler has, mixed at random."""
    features = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_p=0.9),
        dict(temperature=1.2, top_k=int(rng.integers(1, 50))),
        dict(temperature=0.7, min_p=0.05),
        dict(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3),
        dict(temperature=0.9, repetition_penalty=1.3),
        dict(temperature=0.0, logit_bias={int(t): 2.0 for t in rng.integers(3, 200, int(rng.integers(1, 30)))}),
        dict(temperature=0.0, min_tokens=4, stop_token_ids=[5, 6]),
        dict(temperature=0.6, logprobs=int(rng.integers(0, 21))),
        dict(temperature=0.0, prompt_logprobs=int(rng.integers(0, 21))),
        dict(temperature=1.0, n=2, seed=i),
    ]
    params = dict(features[i % len(features)])
    if rng.random() < 0.3:  # and now and then a second feature on top
        params.update({k: v for k, v in features[int(rng.integers(0, len(features)))].items() if k != "n"})
    return params


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_no_compiles_after_warmup(model, async_scheduling):
    """Every sampling feature, prompt logprobs, n > 1, preemption and every step size: nothing
    compiles once the engine has warmed up."""
    engine = _engine(model, async_scheduling=async_scheduling, num_pages=48)
    rng = np.random.default_rng(1)
    with CompileCounter() as counter:
        for i in range(33):
            n = int(rng.integers(1, 100))
            engine.add_request(f"r{i}", {"prompt_token_ids": rng.integers(3, 200, n).tolist()},
                               SamplingParams(max_tokens=int(rng.integers(1, 128 - n + 1)), ignore_eos=True,
                                              **_feature_params(rng, i)))
            for _ in range(int(rng.integers(0, 5))):
                engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.scheduler.num_preemptions_total > 0, "the pool was meant to force preemption"
    assert counter.count == 0, f"{counter.count} compilations after warm-up"


@pytest.mark.parametrize("head_dim, qk_norm", [(None, False), (40, False), (None, True)])
def test_pallas_backend_matches_xla(model, head_dim, qk_norm, monkeypatch):
    """The ragged Pallas kernel (interpret mode here) inside the engine gives the XLA path's
    tokens, also for a head size the kernel tiles only zero-padded (40 lanes in a 64-lane cache).
    The model's own head size takes the fused q|k|v finish (RoPE and the k/v writes in one
    kernel, with Qwen3's per-head q/k norms where the model has them); the padded one the
    unfused path."""
    from jaxinfer.models.paged_attention_pallas import PagedAttentionPallas

    fused_layers = []
    attend_qkv = PagedAttentionPallas.attend_qkv
    monkeypatch.setattr(PagedAttentionPallas, "attend_qkv",
                        lambda self, *a, **kw: fused_layers.append(1) or attend_qkv(self, *a, **kw))
    if head_dim is not None or qk_norm:
        model = tiny_model(seed=3, **({"head_dim": head_dim} if head_dim else {"qk_norm": True}))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (1, 5, 13, 30)]
    outs = {}
    for backend in ("xla", "pallas"):
        engine = _engine(model, attention_backend=backend, warmup=False, max_num_batched_tokens=16)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), {"prompt_token_ids": p},
                               SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        outs[backend] = done
        if head_dim is not None:
            assert engine.kv_spec.head_dim == (64 if backend == "pallas" else head_dim)
    assert outs["pallas"] == outs["xla"]
    assert bool(fused_layers) == (head_dim is None)


def test_warm_engine_runs_the_ahead_of_time_executables(model, monkeypatch):
    """After warm-up, steps, samplers and prompt scorers of every bucket run from the programs
    `precompile` built; the jitted functions (which would trace and compile) are never called."""
    from jaxinfer.engine import runner as runner_module

    engine = _engine(model)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a jitted function ran instead of its precompiled executable")

    monkeypatch.setattr(engine.runner, "_step", must_not_run)
    monkeypatch.setattr(engine.runner, "_score", must_not_run)
    monkeypatch.setattr(engine.runner, "_commit", must_not_run, raising=False)
    monkeypatch.setattr(runner_module, "sample_packed", must_not_run)
    rng = np.random.default_rng(2)
    for i in range(8):
        n = int(rng.integers(1, 60))
        engine.add_request(f"r{i}", {"prompt_token_ids": rng.integers(3, 200, n).tolist()},
                           SamplingParams(max_tokens=int(rng.integers(1, 30)), ignore_eos=True,
                                          **_feature_params(rng, i)))
    while engine.has_unfinished_requests():
        engine.step()


def test_greedy_rows_share_one_prepared_sampler(model):
    """Greedy rows with any other parameters set (top-p, top-k, min-p, a seed) need no metadata
    of their own: one prepared sampler per row count serves them all, and its tokens are the
    NumPy argmax of each row, padded for the next step; a row of another kind builds its own."""
    import jax

    from jaxinfer.engine.sampling import SamplingRow

    runner = _engine(model, warmup=False).runner
    s, v = 4, model.config.vocab_size
    logits = np.random.default_rng(5).normal(size=(s, v)).astype(np.float32)
    variety = [dict(), dict(top_p=0.5), dict(top_k=3, seed=9), dict(min_p=0.2)]
    rows = [SamplingRow(SamplingParams(temperature=0.0, **kw), [1, 2], [3] * i) for i, kw in enumerate(variety)]
    prepared = runner._prepare_sampler(s, ["a", "b", "c", "d"], rows)
    assert runner._prepare_sampler(s, ["e", "f", "g", "h"], rows[::-1]) is prepared
    sampled, padded = runner._run_sampler(prepared, jax.device_put(logits))
    np.testing.assert_array_equal(np.asarray(sampled.token_ids), logits.argmax(axis=1))
    expected = np.zeros(runner.rc.max_logits_rows, np.int32)
    expected[:s] = logits.argmax(axis=1)
    np.testing.assert_array_equal(np.asarray(padded), expected)
    random_row = SamplingRow(SamplingParams(temperature=0.7, seed=1), [1], [])
    assert runner._prepare_sampler(s, ["a", "b", "c", "d"], rows[:3] + [random_row]) is not prepared
