"""The sampler against a NumPy reference written here, step by step and end to end."""

import jax
import numpy as np
import pytest

from jaxinfer.engine.compile_counter import CompileCounter
from jaxinfer.engine.sampling import (HISTORY_CHUNK, NO_SLOT, PenaltySlots, SamplingMetadata, SamplingRow,
                                      SamplingWidths, filter_logits, process_logits, prompt_logprobs, sample,
                                      sampler_variant)
from jaxinfer.sampling_params import SamplingParams

V = 24
EOS = (1,)
# Small fixed widths, so tests share compiled graphs; random_row's lists fit them.
WIDTHS = SamplingWidths(logit_bias=4, banned_ids=4)


# --- NumPy reference -------------------------------------------------------------------------

def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def log_softmax(x):
    x = x.astype(np.float64)
    m = np.max(x)
    return x - m - np.log(np.sum(np.exp(x - m)))


def ref_process(logits, row: SamplingRow):
    """Bias, min-tokens mask and penalties for one row, in float64."""
    p, out = row.params, list(row.output_token_ids)
    x = logits.astype(np.float64).copy()
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    if len(out) < p.min_tokens:
        x[list(p.stop_ids(EOS))] = -np.inf
    counts = np.bincount(np.array(out, int), minlength=len(x)).astype(np.float64)
    seen = counts > 0
    seen[list(row.prompt_token_ids)] = True
    rp = np.where(seen, p.repetition_penalty, 1.0)
    x = np.where(x > 0, x / rp, x * rp)
    return x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def ref_filter(scaled, min_p, top_k, top_p):
    """min-p, top-k, top-p; each keeps every token at or above its threshold (ties kept)."""
    x = scaled.copy()
    if min_p > 0:
        probs = softmax(x)
        x[probs < min_p * probs.max()] = -np.inf
    if 0 < top_k < len(x):
        x[x < np.sort(x)[::-1][top_k - 1]] = -np.inf
    if top_p < 1:
        desc = np.sort(x)[::-1]
        probs = softmax(desc)
        before = np.cumsum(probs) - probs
        x[x < desc[np.sum(before < top_p) - 1]] = -np.inf
    return x


def ref_probs(logits, row):
    p = row.params
    return softmax(ref_filter(ref_process(logits, row) / p.temperature, p.min_p, p.top_k, p.top_p))


# --- helpers ---------------------------------------------------------------------------------

def row(prompt=(0,), output=(), **params):
    params.setdefault("seed", 0)
    return SamplingRow(SamplingParams(max_tokens=None, **params), list(prompt), list(output))


def with_history(rows, num_slots=None):
    """The penalty state holding each row's history (as the engine writes it), and the slots."""
    slots = PenaltySlots(num_slots or len(rows), V)
    ids = [f"r{i}" if r is not None else None for i, r in enumerate(rows)]
    live = [(rid, r) for rid, r in zip(ids, rows) if r is not None]
    assigned = dict(zip([rid for rid, _ in live], slots.slots_for([rid for rid, _ in live], [r for _, r in live])))
    return slots, [assigned.get(rid, NO_SLOT) for rid in ids]


def run(logits, rows, *, full=True, widths=WIDTHS):
    """Samples rows (padded to the logits' batch). By default with the full variant, which must
    not change any row's result; it also keeps the number of compiled graphs small."""
    slots, row_slots = with_history(rows)
    md = SamplingMetadata.build(rows, batch_size=logits.shape[0], vocab_size=logits.shape[1],
                                eos_token_ids=EOS, widths=widths, penalty_slots=row_slots,
                                variant="full" if full else None)
    out, _ = sample(logits, md, slots.state if md.variant == "full" else None)
    return jax.tree.map(np.asarray, out)


def random_row(rng, **fixed):
    prompt = rng.integers(0, V, rng.integers(1, 10))
    output = rng.integers(0, V, rng.integers(0, 12))
    params = dict(
        temperature=float(rng.choice([0.0, 0.5, 1.0, 1.7])),
        presence_penalty=float(rng.uniform(-2, 2)) * rng.integers(0, 2),
        frequency_penalty=float(rng.uniform(-2, 2)) * rng.integers(0, 2),
        repetition_penalty=float(rng.choice([1.0, 0.7, 1.3, 2.0])),
        logit_bias={int(t): float(rng.uniform(-5, 5)) for t in rng.integers(0, V, rng.integers(0, 4))},
        min_tokens=int(rng.integers(0, 15)), stop_token_ids=[int(t) for t in rng.integers(0, V, 2)],
        ignore_eos=bool(rng.integers(0, 2)), seed=int(rng.integers(0, 2**40)))
    params.update(fixed)
    return row(prompt, output, **params)


# --- the reference itself on hand-computed cases ---------------------------------------------

def test_reference_penalties_by_hand():
    r = row(prompt=[0], output=[2, 2, 1], repetition_penalty=2.0, frequency_penalty=0.5,
            presence_penalty=0.25)
    np.testing.assert_allclose(ref_process(np.array([2.0, -1.0, 0.5, 3.0]), r), [1.0, -2.75, -1.0, 3.0])


def test_reference_filters_by_hand():
    x = np.log(np.array([0.5, 0.2, 0.2, 0.1]))
    assert np.isfinite(ref_filter(x, 0.0, 0, 0.45)).tolist() == [True, False, False, False]
    assert np.isfinite(ref_filter(x, 0.0, 0, 0.6)).tolist() == [True, True, True, False]  # tie kept
    assert np.isfinite(ref_filter(x, 0.0, 2, 1.0)).tolist() == [True, True, True, False]  # tie kept
    assert np.isfinite(ref_filter(x, 0.3, 0, 1.0)).tolist() == [True, True, True, False]
    assert np.isfinite(ref_filter(x, 0.5, 0, 1.0)).tolist() == [True, False, False, False]


# --- each step against the reference ---------------------------------------------------------

def test_penalties_bias_and_min_tokens_match_reference():
    rng = np.random.default_rng(0)
    rows = [random_row(rng) for _ in range(7)] + [None]
    logits = rng.normal(0, 3, (8, V)).astype(np.float32)
    slots, row_slots = with_history(rows)
    md = SamplingMetadata.build(rows, batch_size=8, vocab_size=V, eos_token_ids=EOS, widths=WIDTHS,
                                penalty_slots=row_slots)
    assert md.variant == "full"
    got = np.asarray(jax.jit(process_logits)(logits, md, slots.state))
    for i, r in enumerate(rows[:-1]):
        want = ref_process(logits[i], r)
        np.testing.assert_array_equal(np.isinf(got[i]), np.isinf(want))
        np.testing.assert_allclose(got[i][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5, atol=1e-5)


def test_penalty_by_hand_on_device():
    r = row(prompt=[0], output=[2, 2, 1], repetition_penalty=2.0, frequency_penalty=0.5,
            presence_penalty=0.25)
    slots = PenaltySlots(1, 4)
    md = SamplingMetadata.build([r], batch_size=1, vocab_size=4, penalty_slots=slots.slots_for(["a"], [r]))
    got = jax.jit(process_logits)(np.array([[2.0, -1.0, 0.5, 3.0]], np.float32), md, slots.state)
    np.testing.assert_allclose(np.asarray(got)[0], [1.0, -2.75, -1.0, 3.0])


@pytest.mark.parametrize("ties", [False, True])
def test_filters_match_reference(ties):
    rng = np.random.default_rng(1 + ties)
    b = 64
    if ties:  # few distinct values, so top-k and top-p cut inside groups of equal logits
        scaled = rng.integers(-3, 3, (b, V)).astype(np.float32)
    else:
        scaled = rng.normal(0, 2, (b, V)).astype(np.float32)
    min_p = rng.choice([0.0, 0.05, 0.3], b).astype(np.float32)
    top_k = rng.choice([0, 1, 3, 7, V], b).astype(np.int32)
    top_p = rng.choice([1.0, 0.3, 0.8, 0.95], b).astype(np.float32)
    filt = jax.jit(filter_logits, static_argnames=("use_min_p", "use_top_k_top_p"))
    got = np.asarray(filt(scaled, min_p, top_k, top_p, use_min_p=True, use_top_k_top_p=True))
    for i in range(b):
        want = ref_filter(scaled[i].astype(np.float64), min_p[i], top_k[i], top_p[i])
        np.testing.assert_array_equal(np.isfinite(got[i]), np.isfinite(want), err_msg=f"row {i}")
        np.testing.assert_array_equal(got[i][np.isfinite(want)], scaled[i][np.isfinite(want)])


def test_greedy_rows_take_argmax_of_processed_logits():
    rng = np.random.default_rng(3)
    rows = [random_row(rng, temperature=0.0) for _ in range(5)]
    rows += [random_row(rng, temperature=1.0, top_k=3) for _ in range(3)]  # mixed batch
    logits = rng.normal(0, 3, (8, V)).astype(np.float32)
    got = run(logits, rows).token_ids
    for i in range(5):
        assert got[i] == np.argmax(ref_process(logits[i], rows[i]))


def test_all_greedy_batch_with_padding():
    rng = np.random.default_rng(4)
    rows = [random_row(rng, temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0,
                       repetition_penalty=1.0, logit_bias=None, min_tokens=0) for _ in range(5)]
    logits = rng.normal(0, 3, (8, V)).astype(np.float32)
    logits[5:] = np.nan  # padding rows' logits must not matter
    out = run(logits, rows, full=False)
    assert out.token_ids[:5].tolist() == [np.argmax(ref_process(logits[i], rows[i])) for i in range(5)]
    assert out.logprobs is None


# --- random sampling: support, distribution, reproducibility -----------------------------------

DISTRIBUTIONS = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=4),
    dict(temperature=1.0, top_p=0.7, min_p=0.05),
    dict(temperature=0.9, top_k=6, top_p=0.9, repetition_penalty=1.5, logit_bias={3: 2.0}),
]


def test_distribution_and_support():
    """Many seeds side by side over several steps: each row's draws follow its reference."""
    rng = np.random.default_rng(5)
    seeds_per_config, num_steps = 128, 32
    logits = rng.normal(0, 1.5, (len(DISTRIBUTIONS), V)).astype(np.float32)
    configs = [row(prompt=[0, 3, 4], **params) for params in DISTRIBUTIONS]
    params = [c.params.clone(seed=s) for c in configs for s in range(seeds_per_config)]
    batch = np.repeat(logits, seeds_per_config, axis=0)
    tokens = []
    for step in range(num_steps):
        rows = [SamplingRow(p, [0, 3, 4], [0] * step) for p in params]  # token 0 is in the prompt
        tokens.append(run(batch, rows).token_ids.reshape(len(configs), seeds_per_config))
    tokens = np.concatenate(tokens, axis=1)
    for config, logits_row, drawn in zip(configs, logits, tokens):
        want = ref_probs(logits_row, config)
        assert np.all(want[drawn] > 0), f"{config.params}: sampled a filtered-out token"
        freq = np.bincount(drawn, minlength=V) / len(drawn)
        # Each token's frequency within 5 standard deviations of its probability.
        tolerance = 5 * np.sqrt(want * (1 - want) / len(drawn)) + 1e-3
        assert np.all(np.abs(freq - want) <= tolerance), (config.params, freq, want)


def test_seeded_row_is_independent_of_batch_and_position():
    rng = np.random.default_rng(6)
    logits_row = rng.normal(0, 1, V).astype(np.float32)
    target = dict(temperature=0.9, top_k=10, top_p=0.95, seed=1234)
    small = dict(others=[row(temperature=0.0), None, row(temperature=0.5, seed=9)], index=0, b=4,
                 full=False)
    large = dict(others=[row(output=[5, 5], temperature=1.2, seed=7, repetition_penalty=1.3,
                             logprobs=2, min_p=0.2, logit_bias={2: 3.0})] * 7, index=6, b=8,
                 full=True)
    runs = []
    for setup in (small, large):
        tokens, output = [], []
        for _ in range(12):
            rows = list(setup["others"])
            rows.insert(setup["index"], row(prompt=[1], output=output, **target))
            logits = rng.normal(0, 1, (setup["b"], V)).astype(np.float32)
            logits[setup["index"]] = logits_row
            out = run(logits, rows, full=setup["full"])
            token = int(out.token_ids[setup["index"]])
            tokens.append(token)
            output = output + [token]
        runs.append(tokens)
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1  # the key moves with the step


def test_different_seeds_differ():
    logits = np.zeros((8, V), np.float32)
    rows = [row(temperature=1.0, seed=s) for s in range(8)]
    assert len(set(run(logits, rows).token_ids.tolist())) > 3


def test_large_and_negative_seeds():
    logits = np.zeros((8, V), np.float32)
    rows = [row(temperature=1.0, seed=s) for s in (-1, 2**63 - 1, 2**40 + 5, 2**40 + 6)]
    a = run(logits, rows).token_ids[:4]
    b = run(logits, rows[::-1]).token_ids[:4][::-1]
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) > 1


# --- logprobs --------------------------------------------------------------------------------

def check_logprobs(lp, i, raw, token, n):
    want = log_softmax(raw)
    np.testing.assert_allclose(lp.token_logprobs[i], want[token], rtol=1e-5, atol=1e-6)
    assert lp.token_ranks[i] == np.sum(want >= want[token])
    order = np.argsort(-want, kind="stable")[:n]  # equal logprobs: lower id first
    assert lp.top_ids[i, :n].tolist() == order.tolist()
    np.testing.assert_allclose(lp.top_logprobs[i, :n], want[order], rtol=1e-5, atol=1e-6)


def test_logprobs_are_raw():
    rng = np.random.default_rng(7)
    logits = rng.integers(-4, 4, (8, V)).astype(np.float32)  # ties in ranks and top ids
    rows = [row(temperature=0.0, logprobs=3, repetition_penalty=2.0, output=[5]),
            row(temperature=1.0, seed=3, logprobs=0, logit_bias={7: 50.0}),
            row(temperature=0.0),
            row(temperature=0.6, seed=4, logprobs=1, top_k=2)]
    assert sampler_variant(rows) == "full"
    out = run(logits, rows, full=False)
    assert out.logprobs.top_ids.shape == (8, 20)
    assert out.token_ids[1] == 7
    for i, n in [(0, 3), (1, 0), (3, 1)]:
        check_logprobs(out.logprobs, i, logits[i], out.token_ids[i], n)


def test_prompt_logprobs():
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 2, (6, V)).astype(np.float32)
    logits[2, :4] = logits[2, 4]  # ties
    targets = rng.integers(0, V, 6).astype(np.int32)
    lp = jax.tree.map(np.asarray, prompt_logprobs(logits, targets, num_logprobs=4))
    for t in range(6):
        check_logprobs(lp, t, logits[t], targets[t], 4)


# --- building metadata -----------------------------------------------------------------------

def test_build_pads_to_fixed_widths():
    widths = SamplingWidths(logit_bias=8, banned_ids=4)
    rows = [row(output=[1, 2, 3], frequency_penalty=0.5, logit_bias={1: 1.0, 2: 1.0, 3: 1.0}),
            row(prompt=list(range(5)), repetition_penalty=1.1, min_tokens=2, stop_token_ids=[4, 5]),
            row(temperature=1.0, seed=0, logprobs=1)]
    md = SamplingMetadata.build(rows, batch_size=4, vocab_size=V, eos_token_ids=EOS, widths=widths,
                                penalty_slots=[3, 0, NO_SLOT])
    assert md.variant == "full" and md.num_logprobs == 20
    assert md.bias_ids.shape == md.bias_values.shape == (4, 8)
    assert md.banned_ids.shape == (4, 4) and md.banned_ids[1].tolist() == [1, 4, 5, -1]
    assert md.penalty_slots.tolist() == [3, 0, NO_SLOT, NO_SLOT]
    assert md.temperature[3] == 0.0 and md.top_p[3] == 1.0  # padding row is greedy and neutral


@pytest.mark.parametrize("rows,variant", [
    ([row(temperature=0.0), None], "greedy"),
    ([row(temperature=0.0), row(temperature=0.8)], "random"),
    ([row(temperature=0.8, top_k=3), row(temperature=0.0, top_p=0.5)], "filtered"),
    ([row(temperature=0.8, min_p=0.1)], "filtered"),
    ([row(temperature=0.0, logprobs=0)], "full"),
    ([row(temperature=0.0, logit_bias={1: 1.0})], "full"),
    ([row(temperature=0.0, presence_penalty=0.1)], "full"),
    ([row(temperature=0.0, min_tokens=2)], "full"),  # eos is masked
    ([row(temperature=0.0, min_tokens=2, output=[0, 0])], "greedy"),  # min_tokens reached
])
def test_variant_is_the_cheapest_that_serves(rows, variant):
    assert sampler_variant(rows, EOS) == variant
    md = SamplingMetadata.build(rows, batch_size=2, vocab_size=V, eos_token_ids=EOS, widths=WIDTHS,
                                penalty_slots=[0, 1])
    assert md.variant == variant
    assert md.bias_ids.shape[1] == (WIDTHS.logit_bias if variant == "full" else 0)


@pytest.mark.parametrize("rows,kw,match", [
    ([row()] * 3, dict(batch_size=2), "do not fit"),
    ([SamplingRow(SamplingParams(temperature=1.0), [0], [])], {}, "seed"),
    ([row(temperature=0.0, logit_bias={V: 1.0})], {}, "logit_bias token id"),
    ([row(temperature=0.0, min_tokens=3, stop_token_ids=[V + 1])], {}, "outside the vocabulary"),
    ([row(temperature=0.0, logit_bias={t: 1.0 for t in range(5)})], {}, "width"),
    ([row(temperature=0.0, presence_penalty=1.0)], {}, "no slot"),
    ([row(temperature=0.0, logprobs=1)], dict(variant="filtered"), "need the 'full' sampler"),
])
def test_build_rejects(rows, kw, match):
    kw = {"batch_size": 4, "widths": WIDTHS, **kw}
    with pytest.raises(ValueError, match=match):
        SamplingMetadata.build(rows, vocab_size=V, **kw)


def test_width_validation():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingWidths(logit_bias=0)


# --- the penalty state -----------------------------------------------------------------------

def test_penalty_state_holds_long_histories_and_counts_sampled_tokens():
    """Histories longer than a write chunk, tokens counted as they are sampled, slots reused."""
    rng = np.random.default_rng(11)
    prompt = rng.integers(0, V, HISTORY_CHUNK + 37).tolist()
    output = rng.integers(0, V, 2 * HISTORY_CHUNK + 5).tolist()
    r = row(prompt=prompt, output=output, temperature=0.0, frequency_penalty=0.5, repetition_penalty=1.5)
    slots = PenaltySlots(2, V)
    [slot] = slots.slots_for(["a"], [r])
    state = jax.tree.map(np.asarray, slots.state)
    np.testing.assert_array_equal(state.output_counts[slot], np.bincount(output, minlength=V))
    np.testing.assert_array_equal(state.prompt_mask[slot], np.bincount(prompt, minlength=V) > 0)
    logits = rng.normal(0, 1, (2, V)).astype(np.float32)
    md = SamplingMetadata.build([r, None], batch_size=2, vocab_size=V, penalty_slots=[slot, NO_SLOT])
    out, slots.state = sample(logits, md, slots.state)
    token = int(out.token_ids[0])
    assert token == np.argmax(ref_process(logits[0], r))
    counts = np.asarray(slots.state.output_counts)
    np.testing.assert_array_equal(counts[slot], np.bincount(output + [token], minlength=V))
    assert counts[1 - slot].sum() == 0  # the padding row counted nothing
    # A second holder takes the free slot; a third reuses the slot of one not in its batch,
    # cleared before its own history is written.
    b = row(prompt=[2], output=[5, 5], presence_penalty=1.0)
    assert slots.slots_for(["a", "b"], [r, b])[1] == 1 - slot
    c = row(prompt=[3], output=[7], presence_penalty=1.0)
    assert slots.slots_for(["c", "b"], [c, b])[0] == slot
    counts = np.asarray(slots.state.output_counts)
    np.testing.assert_array_equal(counts[slot], np.bincount([7], minlength=V))
    with pytest.raises(RuntimeError, match="more than 2"):
        slots.slots_for(["a", "b", "c"], [r, b, c])
    slots.release(["b", "c"])
    assert len(slots) == 0


def test_new_history_needs_every_token_on_the_host():
    slots = PenaltySlots(1, V)
    r = SamplingRow(SamplingParams(presence_penalty=1.0), [0], [1], num_pending_outputs=1)
    with pytest.raises(RuntimeError, match="in flight"):
        slots.slots_for(["a"], [r])


# --- compiles --------------------------------------------------------------------------------

def test_every_combination_runs_on_four_graphs():
    """Batches mixing every feature (penalties, bias, min_tokens, min-p, top-k/p, logprobs of
    any width, seeds) reuse the four compiled variants of a batch size."""
    rng = np.random.default_rng(9)
    slots = PenaltySlots(8, V)

    def step(rows):
        ids = [str(i) for i in range(len(rows))]
        variant = sampler_variant(rows, EOS)
        row_slots = slots.slots_for(ids, rows) if variant == "full" else None
        md = SamplingMetadata.build(rows, batch_size=8, vocab_size=V, eos_token_ids=EOS, widths=WIDTHS,
                                    penalty_slots=row_slots)
        logits = rng.normal(0, 1, (8, V)).astype(np.float32)
        if variant == "full":
            _, slots.state = sample(logits, md, slots.state)
        else:
            sample(logits, md)
        slots.release(ids)
        return variant

    plain = dict(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=None,
                 min_tokens=0)

    def batch(kind):
        if kind == "full":
            rows = [random_row(rng, temperature=1.0, min_p=0.1, logprobs=int(rng.integers(0, 21))),
                    random_row(rng, temperature=0.5, top_k=int(rng.integers(1, V)), repetition_penalty=1.2),
                    random_row(rng), random_row(rng, temperature=0.0)]
        elif kind == "filtered":
            rows = [random_row(rng, temperature=0.7, top_p=0.8, **plain), random_row(rng, min_p=0.2, **plain)]
        elif kind == "random":
            rows = [random_row(rng, temperature=1.0, **plain), random_row(rng, temperature=0.0, **plain)]
        else:
            rows = [random_row(rng, temperature=0.0, **plain)]
        rows += [None] * int(rng.integers(0, 8 - len(rows)))
        return rows

    kinds = ["greedy", "random", "filtered", "full"]
    for kind in kinds:
        assert step(batch(kind)) == kind
    slots.warmup()
    with CompileCounter() as counter:
        for i in range(16):
            step(batch(kinds[i % 4]))
    assert counter.count == 0
    with CompileCounter() as counter:  # the counter does see a new shape
        run(np.zeros((2, V), np.float32), [row(temperature=0.0)], full=False)
    assert counter.count > 0
