"""Speculative decoding: n-gram proposals verified inside the engine's own steps.

Greedy output must equal non-speculative decoding token for token (against the reference loop
in jaxinfer.generate, under batching, chunked prefill and preemption, with async scheduling
on and off); sampled verification must leave every token distributed as the row's own
distribution (a chi-square test against a float64 NumPy reference); rejected proposals' KV
must never be served from the prefix cache.
"""

import argparse

import jax
import numpy as np
import pytest
from scipy import stats

from jaxinfer.engine.compile_counter import CompileCounter
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.engine.sampling import SamplingMetadata, SamplingRow, sample
from jaxinfer.engine.speculative import SpeculativeConfig, ngram_proposal
from jaxinfer.generate import generate
from jaxinfer.sampling_params import SamplingParams
from tests.engine_fixtures import tiny_model
from tests.test_sampling import EOS, V, ref_probs

# The proposal mechanics are tested with proposals whenever possible; the governor that turns
# them off where they do not pay has its own tests below.
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "adaptive": False}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _perturbed(model, scale: float, seed: int = 0):
    """The model with every weight multiplied by (1 + scale * noise): a draft that mostly
    agrees with it, but not always."""
    import dataclasses

    keys = iter(jax.random.split(jax.random.key(seed), 64))
    params = jax.tree.map(lambda x: x * (1 + scale * jax.random.normal(next(keys), x.shape, x.dtype)), model.params)
    return dataclasses.replace(model, params=params)


def _engine(model, **kw):
    cfg = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, page_size=4, num_pages=64,
               compilation_cache_dir="", warmup=False, speculative_config=NGRAM)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg), kv_fill=float("nan"))


def _repetitive_prompts(rng, count: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so n-gram lookup finds matches (in them and in outputs:
    the peaked tiny model falls into loops)."""
    prompts = []
    for _ in range(count):
        phrase = rng.integers(3, 200, int(rng.integers(2, 8))).tolist()
        prompts.append(rng.integers(3, 200, int(rng.integers(0, 6))).tolist() + phrase * int(rng.integers(2, 5)))
    return prompts


def _run(engine, requests, arrivals=None):
    """Adds requests (at their arrival step) and steps until all finish; outputs by id."""
    done, step = {}, 0
    pending = sorted(requests, key=lambda r: (arrivals or {}).get(r[0], 0))
    while pending or engine.has_unfinished_requests():
        while pending and (arrivals or {}).get(pending[0][0], 0) <= step:
            rid, prompt, params = pending.pop(0)
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 5000
    return done


# --- proposals and settings -------------------------------------------------------------------

def _brute_force_proposal(tokens, min_n, max_n, k):
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest occurrence first
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_proposal_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(400):
        tokens = rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(1, 40))).tolist()
        lo = int(rng.integers(1, 4))
        hi = lo + int(rng.integers(0, 3))
        k = int(rng.integers(1, 6))
        assert ngram_proposal(tokens, min_n=lo, max_n=hi, k=k) == _brute_force_proposal(tokens, lo, hi, k)
    assert ngram_proposal([5, 6, 7, 5, 6], min_n=2, max_n=2, k=3) == [7, 5, 6]
    assert ngram_proposal([1, 2, 3], min_n=1, max_n=3, k=2) == []


def test_config_defaults_and_errors():
    assert SpeculativeConfig.from_dict({"method": "ngram"}).prompt_lookup_min == 5  # vLLM's defaults
    cfg = SpeculativeConfig.from_dict({"method": "ngram", "prompt_lookup_max": 3, "num_speculative_tokens": 2})
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (3, 3)
    with pytest.raises(ValueError, match="unknown speculative_config keys"):
        SpeculativeConfig.from_dict({"method": "ngram", "lookahead": 3})
    with pytest.raises(ValueError, match="not supported yet"):
        SpeculativeConfig.from_dict({"method": "eagle3", "model": "x"})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="exceeds"):
        SpeculativeConfig.from_dict({"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2})
    assert EngineConfig(speculative_config=NGRAM).speculative_config.num_speculative_tokens == 3


def test_cli_flag_reaches_the_engine_config():
    from jaxinfer.cli import _add_engine_args, engine_config_kwargs

    p = argparse.ArgumentParser()
    _add_engine_args(p)
    args = p.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    assert EngineConfig(**engine_config_kwargs(args)).speculative_config.num_speculative_tokens == 2
    with pytest.raises(SystemExit):
        p.parse_args(["--speculative-config", "[1, 2]"])


# --- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("async_scheduling,method", [(False, "ngram"), (True, "ngram"), (True, "draft_model")])
def test_greedy_equals_reference_under_batching_chunking_and_preemption(model, async_scheduling, method):
    rng = np.random.default_rng(1)
    prompts = _repetitive_prompts(rng, 16)
    max_tokens = [int(rng.integers(4, 40)) for _ in prompts]
    requests = [(str(i), p, SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True,
                                           logprobs=2 if i % 3 == 0 else None))
                for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    arrivals = {str(i): int(rng.integers(0, 30)) for i in range(len(prompts))}
    # 30 usable pages of 4 tokens for up to 8 sequences of ~70 tokens: preemption; a budget of
    # 16 tokens: long prompts arrive in chunks beside other requests' verification.
    spec = NGRAM if method == "ngram" else {"method": "draft_model", "adaptive": False, "model": _perturbed(model, 0.05),
                                            "num_speculative_tokens": 3}
    engine = _engine(model, num_pages=31, max_model_len=96, max_num_batched_tokens=16,
                     async_scheduling=async_scheduling, speculative_config=spec)
    done = _run(engine, requests, arrivals)
    m = engine.metrics
    assert engine.scheduler.num_preemptions_total > 0, "the pool was meant to force preemption"
    assert m.spec_decode_num_accepted_tokens_total > 10, "proposals were meant to be accepted"
    assert m.spec_decode_num_accepted_tokens_total < m.spec_decode_num_draft_tokens_total, "and some rejected"
    assert engine.block_manager.usage == 0
    plain = _run(_engine(model, speculative_config=None), requests)
    for i, p in enumerate(prompts):
        [ref] = generate(model, [p], max_tokens[i])
        out = done[str(i)].outputs[0]
        assert out.token_ids == ref, f"request {i}"
        if i % 3 == 0:  # logprobs of accepted tokens are the verifying rows'
            want = plain[str(i)].outputs[0].logprobs
            assert [sorted(e) for e in out.logprobs] == [sorted(e) for e in want]
            np.testing.assert_allclose([[e[t].logprob for t in sorted(e)] for e in out.logprobs],
                                       [[e[t].logprob for t in sorted(e)] for e in want], atol=1e-4)


def test_draft_model_equal_to_the_target_accepts_everything(model):
    rng = np.random.default_rng(6)
    prompts = _repetitive_prompts(rng, 6)
    engine = _engine(model, speculative_config={"method": "draft_model", "adaptive": False, "model": model, "num_speculative_tokens": 4})
    done = _run(engine, [(str(i), p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
                         for i, p in enumerate(prompts)])
    m = engine.metrics
    assert m.spec_decode_num_draft_tokens_total > 50
    assert m.spec_decode_num_accepted_tokens_total == m.spec_decode_num_draft_tokens_total
    for i, p in enumerate(prompts):
        assert done[str(i)].outputs[0].token_ids == generate(model, [p], 24)[0]
    with pytest.raises(ValueError, match="vocabulary"):
        _engine(model, speculative_config={"method": "draft_model", "adaptive": False, "model": tiny_model(vocab_size=300)})
    with pytest.raises(ValueError, match="needs a draft"):
        SpeculativeConfig.from_dict({"method": "draft_model"})


def test_stop_token_among_accepted_proposals_ends_the_output(model):
    """A stop id accepted mid-proposal ends the request there; later accepted tokens vanish."""
    rng = np.random.default_rng(2)
    prompts = _repetitive_prompts(rng, 8)
    refs = [generate(model, [p], 30)[0] for p in prompts]
    requests = []
    for i, (p, ref) in enumerate(zip(prompts, refs)):
        stop = ref[len(ref) // 2]  # a token the greedy output reaches
        requests.append((str(i), p, SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop])))
    done = _run(_engine(model), requests)
    for (rid, _, params), ref in zip(requests, refs):
        cut = ref.index(params.stop_token_ids[0]) + 1
        assert done[rid].outputs[0].token_ids == ref[:cut]
        assert done[rid].outputs[0].finish_reason == "stop"


def test_prefix_cache_never_serves_rejected_proposals(model):
    """Pages published while proposals were verified hold accepted tokens' KV only: prompts
    that extend earlier outputs hit them and still decode exactly as the reference."""
    rng = np.random.default_rng(3)
    prompts = _repetitive_prompts(rng, 8)
    engine = _engine(model, num_pages=120)
    first = _run(engine, [(str(i), p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
                          for i, p in enumerate(prompts)])
    assert engine.metrics.spec_decode_num_draft_tokens_total > engine.metrics.spec_decode_num_accepted_tokens_total
    hits_before = engine.block_manager.num_prefix_hit_tokens
    follow = [p + first[str(i)].outputs[0].token_ids[:20] for i, p in enumerate(prompts)]
    second = _run(engine, [(f"f{i}", p, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                        speculative=False))
                           for i, p in enumerate(follow)])
    assert engine.block_manager.num_prefix_hit_tokens - hits_before > 8 * 16, "the follow-ups should hit"
    for i, p in enumerate(follow):
        assert second[f"f{i}"].outputs[0].token_ids == generate(model, [p], 8)[0]


# --- sampled verification ------------------------------------------------------------------------

SAMPLED = [dict(temperature=0.8, top_p=0.9), dict(temperature=1.3, top_k=5), dict(temperature=1.0, min_p=0.1),
           dict(temperature=0.6)]


@pytest.mark.parametrize("params", SAMPLED)
def test_rejection_sampling_keeps_the_target_distribution(params):
    """Rows verifying a proposal, over many seeds: tokens follow the row's distribution
    (chi-square at significance 1e-3 against float64 NumPy), the proposal is accepted with
    its probability, and a proposal outside the support is never accepted."""
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 1.5, V).astype(np.float32)
    base = SamplingRow(SamplingParams(max_tokens=None, seed=0, **params), [0], [])
    want = ref_probs(logits, base)
    likely, impossible = int(np.argmax(want)), int(np.argmin(want))
    num = 4096
    for draft in (likely, int(np.argsort(want)[-3]), impossible):
        rows = [SamplingRow(base.params.clone(seed=s), [0], [], draft_token_id=draft) for s in range(num)]
        md = SamplingMetadata.build(rows, batch_size=num, vocab_size=V, eos_token_ids=EOS)
        assert md.speculative
        out, _ = sample(np.repeat(logits[None], num, axis=0), md, None)
        tokens, accepted = np.asarray(out.token_ids), np.asarray(out.accepted)
        assert np.array_equal(accepted, tokens == draft)
        support = want > 0
        assert support[tokens].all(), "a filtered-out token was drawn"
        counts = np.bincount(tokens, minlength=V)[support]
        expected = want[support] * num
        # Merge rare categories so every expected count is at least 5 (chi-square's validity).
        order = np.argsort(expected)
        merged_obs, merged_exp, acc_o, acc_e = [], [], 0, 0.0
        for j in order:
            acc_o += counts[j]
            acc_e += expected[j]
            if acc_e >= 5:
                merged_obs.append(acc_o)
                merged_exp.append(acc_e)
                acc_o, acc_e = 0, 0.0
        merged_obs[-1] += acc_o
        merged_exp[-1] += acc_e
        if len(merged_obs) > 1:
            assert stats.chisquare(merged_obs, merged_exp).pvalue > 1e-3, (params, draft)
        rate = accepted.mean()
        assert abs(rate - want[draft]) <= 5 * np.sqrt(want[draft] * (1 - want[draft]) / num) + 1e-3


def test_greedy_rows_accept_exactly_the_argmax():
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 1, (6, V)).astype(np.float32)
    drafts = [int(np.argmax(logits[0])), (int(np.argmax(logits[1])) + 1) % V, -1, int(np.argmax(logits[3])), 0, 5]
    rows = [SamplingRow(SamplingParams(temperature=0.0), [0], [], draft_token_id=d) for d in drafts]
    out, _ = sample(logits, SamplingMetadata.build(rows, batch_size=6, vocab_size=V), None)
    tokens = np.asarray(out.token_ids)
    assert tokens.tolist() == np.argmax(logits, axis=1).tolist()
    assert np.asarray(out.accepted).tolist() == [d == t for d, t in zip(drafts, tokens)]


def test_sampled_outputs_follow_the_same_distribution_with_and_without_speculation(model):
    """Engine end to end, low temperature and top-p (the tiny model is nearly flat otherwise),
    240 seeds each way: the joint distribution of the first three output tokens is the same
    (chi-square two-sample test at 1e-3). The prompt repeats a phrase after the model's own
    continuation of it, so proposals are found and often accepted."""
    phrase = [7, 8, 9, 10, 11]
    prompt = phrase + generate(model, [phrase], 8)[0] + phrase
    params = [SamplingParams(temperature=0.15, top_p=0.95, max_tokens=3, ignore_eos=True, seed=s) for s in range(240)]
    samples = {}
    for name, spec in (("plain", None), ("spec", NGRAM)):
        engine = _engine(model, speculative_config=spec, max_num_seqs=16, num_pages=200, enable_prefix_caching=False)
        done = _run(engine, [(f"{name}{i}", prompt, p) for i, p in enumerate(params)])
        samples[name] = [tuple(done[f"{name}{i}"].outputs[0].token_ids) for i in range(len(params))]
        if spec:
            assert engine.metrics.spec_decode_num_accepted_tokens_total > 10
    categories = sorted(set(samples["plain"]) | set(samples["spec"]))
    table = np.array([[s.count(c) for c in categories] for s in samples.values()])
    # Outcomes rarer than 5 in both runs together form one category (the test's validity).
    common = table.sum(axis=0) >= 5
    table = np.concatenate([table[:, common], table[:, ~common].sum(axis=1, keepdims=True)], axis=1)
    table = table[:, table.sum(axis=0) > 0]
    assert stats.chi2_contingency(table).pvalue > 1e-3


# --- engine behaviour ----------------------------------------------------------------------------

def test_opt_out_and_batch_size_throttle(model):
    rng = np.random.default_rng(4)
    prompts = _repetitive_prompts(rng, 2)
    greedy = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    engine = _engine(model)
    _run(engine, [(str(i), p, SamplingParams(speculative=False, **greedy)) for i, p in enumerate(prompts)])
    assert engine.metrics.spec_decode_num_drafts_total == 0
    engine = _engine(model, speculative_config={**NGRAM, "disable_by_batch_size": 1})
    _run(engine, [(str(i), p, SamplingParams(**greedy)) for i, p in enumerate(prompts)])
    two_running = engine.metrics.spec_decode_num_drafts_total
    _run(engine, [("solo", prompts[0], SamplingParams(**greedy))])
    assert engine.metrics.spec_decode_num_drafts_total > two_running, "one request alone speculates"


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_no_compiles_after_warmup_with_speculation(model, method):
    """Verifying and plain steps of every size, every sampling feature (penalties and grammars
    opt out), n = 2, proposals of every length: nothing compiles once the engine has warmed up."""
    from tests.test_engine import _feature_params

    spec = NGRAM if method == "ngram" else {"method": "draft_model", "adaptive": False, "model": _perturbed(model, 0.05),
                                            "num_speculative_tokens": 3}
    engine = _engine(model, warmup=True, num_pages=48, speculative_config=spec)
    rng = np.random.default_rng(5)
    with CompileCounter() as counter:
        for i in range(20):
            [prompt] = _repetitive_prompts(rng, 1)
            params = _feature_params(rng, i)
            if params.get("prompt_logprobs") is None:
                params.pop("prompt_logprobs", None)
            engine.add_request(f"r{i}", {"prompt_token_ids": prompt},
                               SamplingParams(max_tokens=int(rng.integers(1, 60)), ignore_eos=True, **params))
            for _ in range(int(rng.integers(0, 5))):
                engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.metrics.spec_decode_num_accepted_tokens_total > 0
    assert counter.count == 0, f"{counter.count} compilations after warm-up"


def test_metrics_families_carry_vllm_spec_decode_names(model):
    from jaxinfer.server.metrics import MetricsRenderer, sample_engine

    engine = _engine(model)
    _run(engine, [("a", [5, 6, 7] * 5, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))])
    text = MetricsRenderer("m").render(sample_engine(engine)).decode()
    m = engine.metrics
    assert f'vllm:spec_decode_num_draft_tokens_total{{model_name="m"}} {float(m.spec_decode_num_draft_tokens_total)}' \
        in text
    assert f'vllm:spec_decode_num_accepted_tokens_total{{model_name="m"}} ' \
           f'{float(m.spec_decode_num_accepted_tokens_total)}' in text
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"}' in text
    assert m.spec_decode_mean_accepted_length == 1 + m.spec_decode_num_accepted_tokens_total / \
        m.spec_decode_num_drafts_total
    assert jax.numpy.isfinite(m.spec_decode_acceptance_rate)


def test_failing_proposals_back_off(model):
    """An unrelated draft model's proposals are always rejected: the request proposes again
    after 1, 2, 4, ... rounds, not every step, and its output stays exact."""
    prompt = [5, 9, 13, 17] * 3
    engine = _engine(model, speculative_config={"method": "draft_model", "adaptive": False, "model": tiny_model(seed=5),
                                                "num_speculative_tokens": 3})
    done = _run(engine, [("a", prompt, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))])
    m = engine.metrics
    assert m.spec_decode_num_accepted_tokens_total == 0
    assert 3 <= m.spec_decode_num_drafts_total <= 8, m.spec_decode_num_drafts_total
    assert done["a"].outputs[0].token_ids == generate(model, [prompt], 48)[0]


def test_structured_rows_share_steps_with_verifying_rows(tmp_path):
    """A grammar-constrained request (never speculating) beside requests that verify proposals:
    its mask rows line up with the step's expanded logits rows, its output follows its regex,
    and the others stay exact."""
    import re

    from jaxinfer.sampling_params import StructuredOutputsParams
    from tests.server_fixtures import make_engine, write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "ckpt")
    engines = {name: make_engine(checkpoint, warmup=False, speculative_config=spec)
               for name, spec in (("plain", None), ("spec", NGRAM))}
    tok = engines["plain"].tokenizer
    prompts = [tok.encode("The quick brown fox jumps over the lazy dog. The quick brown fox"),
               tok.encode("Paris is the capital of France, and Paris is the capital of")]
    regex = r"[0-9]{3}-[a-z]{2}"
    outs = {}
    for name, engine in engines.items():
        requests = [(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
                    for i, p in enumerate(prompts)]
        requests.append(("s", prompts[0], SamplingParams(
            temperature=0.0, max_tokens=16, structured_outputs=StructuredOutputsParams(regex=regex))))
        outs[name] = _run(engine, requests)
    assert engines["spec"].metrics.spec_decode_num_drafts_total > 0
    assert re.fullmatch(regex, outs["spec"]["s"].outputs[0].text), outs["spec"]["s"].outputs[0].text
    for rid in ("g0", "g1", "s"):
        assert outs["spec"][rid].outputs[0].token_ids == outs["plain"][rid].outputs[0].token_ids


# -- the governor: propose only while it measures faster ----------------------------------------
def _drive(governor, steps, rate_with, rate_without, num_running=1):
    """Runs the governor against fixed token rates (tokens per 10 ms step); returns its modes."""
    modes = []
    for _ in range(steps):
        mode = governor.speculate(num_running)
        modes.append(mode)
        governor.record(num_running, mode, 0.01, (rate_with if mode else rate_without) * 0.01)
    return modes


def test_governor_keeps_the_faster_mode_and_looks_again():
    from jaxinfer.engine.speculative import SpeculationGovernor

    g = SpeculationGovernor(probe_steps=4, reprobe_every=64)
    modes = _drive(g, 400, rate_with=300.0, rate_without=100.0)
    # Proposals first, then plain steps to measure them, then proposals except for re-probes.
    assert modes[:4] == [True] * 4 and modes[4:9] == [False] * 5
    settled = modes[9:]
    assert sum(settled) / len(settled) >= 64 / 69 - 0.01
    assert g.rates(1) == {True: pytest.approx(300.0), False: pytest.approx(100.0)}
    # Where plain steps are faster (a large batch), it proposes only to re-probe; buckets are
    # separate, so batch 1 keeps proposing meanwhile.
    big = _drive(g, 400, rate_with=5000.0, rate_without=6400.0, num_running=64)
    assert sum(big[20:]) / len(big[20:]) <= 5 / 69 + 0.01
    assert g.speculate(1) or g.speculate(1)
    # A workload that changes is noticed at the next re-probe.
    turned = _drive(g, 200, rate_with=50.0, rate_without=100.0)
    assert sum(turned[100:]) / 100 <= 5 / 69 + 0.02
    with pytest.raises(ValueError):
        SpeculationGovernor(probe_steps=1)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_follows_the_governor(model, async_scheduling):
    """The engine asks the governor before proposing: held off, it proposes nothing; allowed,
    it does; switched every few steps (synchronous proposal steps and asynchronous plain ones
    alternating), greedy outputs still equal the reference loop."""
    from jaxinfer.engine.speculative import SpeculationGovernor

    prompts = _repetitive_prompts(np.random.default_rng(4), 3)
    ref = generate(model, prompts, 12)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    asked = []
    policies = {"never": lambda n: False, "always": lambda n: True,
                "alternating": lambda n: asked.append(n) or len(asked) % 3 != 0}
    for name, policy in policies.items():
        engine = _engine(model, speculative_config={**NGRAM, "adaptive": True}, async_scheduling=async_scheduling)
        assert isinstance(engine._governor, SpeculationGovernor)
        engine._governor.speculate = policy
        done = _run(engine, [(f"r{i}", p, params) for i, p in enumerate(prompts)])
        assert [done[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == ref, name
        assert (engine.metrics.spec_decode_num_drafts_total > 0) == (name != "never"), name
    assert asked and all(n >= 1 for n in asked)
    assert _engine(model)._governor is None  # adaptive False
