"""EAGLE draft heads: the published layout, the paged proposer against a NumPy reference, the
engine's exactness with a head, training on text the model generates, and no compiles after
warm-up.

The reference computes EAGLE's chain from the safetensors tensors themselves (torch Linear
layout) in float64 NumPy, over the target's features from a dense forward: nothing of the
proposer's paging, feature pool, scratch pages or fused layouts is shared with it.
"""

import numpy as np
import pytest
from flax import nnx

from jaxinfer.engine.compile_counter import CompileCounter
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.eagle_training import pack_sequences, target_features, train_head
from jaxinfer.errors import CheckpointError
from jaxinfer.generate import generate
from jaxinfer.loading.eagle import load_eagle_head, save_eagle_head
from jaxinfer.loading.safetensors import SafetensorsCheckpoint
from jaxinfer.models import param_value
from jaxinfer.models.eagle import create_head
from jaxinfer.sampling_params import SamplingParams
from tests.engine_fixtures import tiny_model
from tests.test_speculative import _run


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def trained_head(model, tmp_path_factory):
    """A head trained on the tiny model's own greedy continuations of random prompts (16 of
    them held out; fewer training sequences measurably lower the acceptance below)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 250, int(rng.integers(4, 24))).tolist() for _ in range(112)]
    sequences = [p + out for p, out in zip(prompts, generate(model, prompts, 40))]
    graphdef, state, history = train_head(model, sequences[:96], steps=300, batch_size=16, seq_len=64, lr=3e-3,
                                          noise=0.05, log_every=100, log=lambda s: None, held_out=sequences[96:])
    path = tmp_path_factory.mktemp("head")
    save_eagle_head(path, state, nnx.merge(graphdef, state).config)
    return path, history


def _engine(model, head_dir, **kw):
    spec = {"method": "eagle", "model": str(head_dir), "num_speculative_tokens": 3, "adaptive": False}
    cfg = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, page_size=4, num_pages=64,
               compilation_cache_dir="", warmup=False, speculative_config=spec)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg), kv_fill=float("nan"))


# --- the NumPy reference -------------------------------------------------------------------------

def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, positions, theta):
    h = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
    ang = positions[:, None] * inv[None, :]
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1)[:, None], np.concatenate([np.sin(ang)] * 2, -1)[:, None]
    rotated = np.concatenate([-x[..., h // 2:], x[..., :h // 2]], -1)
    return x * cos + rotated * sin


def _reference_guesses(t, config, embed, tokens, features):
    """EAGLE's head over pairs (features[p], tokens[p]) at positions 0..n-1, from the tensors
    `t` in the published layout."""
    n, d = features.shape
    nh, kh, hd = config.num_heads, config.num_kv_heads, config.head_dim
    x = np.concatenate([embed[tokens], features], -1) @ t["fc.weight"].T
    if "fc.bias" in t:
        x = x + t["fc.bias"]
    p = "layers.0."
    pos = np.arange(n, dtype=np.float64)
    q = _rope((x @ t[p + "self_attn.q_proj.weight"].T).reshape(n, nh, hd), pos, config.rope_theta)
    k = _rope((x @ t[p + "self_attn.k_proj.weight"].T).reshape(n, kh, hd), pos, config.rope_theta)
    v = (x @ t[p + "self_attn.v_proj.weight"].T).reshape(n, kh, hd)
    k, v = np.repeat(k, nh // kh, axis=1), np.repeat(v, nh // kh, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((n, n), bool))[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", probs, v).reshape(n, nh * hd)
    h = x + o @ t[p + "self_attn.o_proj.weight"].T
    h2 = _rms(h, t[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
    gate, up = h2 @ t[p + "mlp.gate_proj.weight"].T, h2 @ t[p + "mlp.up_proj.weight"].T
    return h + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T


def _reference_proposals(t, model, known, k):
    """The chain for known tokens x_0..x_{N-1}: target features of positions 0..N-2, then k
    greedy guesses, each pair appended and the whole sequence run again."""
    state = model.params
    embed = np.asarray(param_value(state["embed"]), np.float64)
    head = np.asarray(param_value(state["lm_head"]), np.float64)
    f = np.asarray(target_features(model.graphdef, state, np.asarray([known[:-1]], np.int32))[0], np.float64)
    tokens, feats, out, margins = list(known[1:]), list(f), [], []
    for _ in range(k):
        guesses = _reference_guesses(t, model.config, embed, np.asarray(tokens), np.asarray(feats))
        logits = guesses[-1] @ head.T
        out.append(int(np.argmax(logits)))
        top2 = np.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]) / max(float(np.abs(logits).max()), 1e-30))
        tokens.append(out[-1])
        feats.append(guesses[-1])
    return out, margins


# A proposal may differ from the float64 chain only where the chain's top two logits are this
# close (relative to the largest logit): a tie that float32 sums in another order (a GPU's
# reductions) can break either way. The tiny model's distributions are nearly flat, so such
# ties occur; after one, the chains diverge and the rest is not compared.
TIE = 1e-5


def _assert_proposals(got, want, margins, where):
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            assert margins[i] < TIE, f"{where}: proposal {i} is {g}, the reference {w} (margin {margins[i]:.3g})"
            return
    assert len(got) == len(want), where


# --- tests ---------------------------------------------------------------------------------------

def test_head_round_trips_through_the_published_layout(model, tmp_path):
    head = create_head(model.config, seed=1)
    graphdef, state = nnx.split(head)
    save_eagle_head(tmp_path, state, head.config)
    names = SafetensorsCheckpoint(tmp_path).names()
    assert {"fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight",
            "layers.0.post_attention_layernorm.weight"} <= names
    assert not any("input_layernorm" in n for n in names)  # EAGLE's layer has no input norm
    _, loaded = load_eagle_head(tmp_path, model.config)
    for a, b in zip(nnx.to_flat_state(state), nnx.to_flat_state(loaded)):
        np.testing.assert_array_equal(np.asarray(a[1].get_value()), np.asarray(b[1].get_value()))
    other = tiny_model(hidden_size=32)
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_eagle_head(tmp_path, other.config)
    with pytest.raises(ValueError, match="needs the head"):
        EngineConfig(speculative_config={"method": "eagle"})


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_proposals_match_the_numpy_reference(model, trained_head, backend):
    """Every proposal the engine's paged proposer made (chunked prompts, several requests per
    round, chains crossing page boundaries into scratch pages) equals the float64 reference;
    "pallas" runs the GPU path (fused q|k|v finish, ragged kernel) in interpret mode."""
    path, _ = trained_head
    engine = _engine(model, path, max_num_batched_tokens=16, attention_backend=backend)
    tensors = {n: np.asarray(SafetensorsCheckpoint(path).get(n), np.float64) for n in SafetensorsCheckpoint(path).names()}
    seen = []
    propose = engine.eagle.propose

    def recording(requests, tables):
        out = propose(requests, tables)
        seen.extend((list(known), k, out.get(rid)) for rid, known, k, _ in requests)
        return out

    engine.eagle.propose = recording
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 250, int(rng.integers(2, 30))).tolist() for _ in range(5)]
    _run(engine, [(str(i), p, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
                  for i, p in enumerate(prompts)])
    # How many rounds there are depends on how many proposals pass (a float32 GPU trains a
    # slightly different head than the CPU): at least two a request, and a dozen of them
    # checked, spread over the run.
    assert len(seen) >= 10
    checked = 0
    for known, k, got in seen[::max(1, len(seen) // 12)]:
        if got:
            _assert_proposals(got, *_reference_proposals(tensors, model, known, k), f"after {len(known)} tokens")
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_equals_reference_with_a_head(model, trained_head, async_scheduling):
    """Bit-identical greedy outputs under batching, chunked prefill and forced preemption; the
    trained head's proposals are mostly accepted."""
    path, history = trained_head
    # (The tiny model's next-token distributions are nearly flat, so the cross-entropy barely
    # moves; the feature regression and the top-1 agreement show the learning.)
    *logged, kept = history
    assert logged[-1]["regression"] < 0.75 * logged[0]["regression"] and logged[-1]["top1"] > 0.4, history
    # On answers it never trained on (chance: 1/256); the state kept is the best of those logged.
    assert kept["held_out_top1"] == max(e["held_out_top1"] for e in logged) > 0.06, history
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 250, int(rng.integers(3, 40))).tolist() for _ in range(12)]
    max_tokens = [int(rng.integers(4, 40)) for _ in prompts]
    requests = [(str(i), p, SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
                for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    arrivals = {str(i): int(rng.integers(0, 30)) for i in range(len(prompts))}
    engine = _engine(model, path, num_pages=31, max_model_len=96, max_num_batched_tokens=16,
                     async_scheduling=async_scheduling)
    done = _run(engine, requests, arrivals)
    m = engine.metrics
    assert engine.scheduler.num_preemptions_total > 0, "the pool was meant to force preemption"
    print("accepted", m.spec_decode_num_accepted_tokens_total, "of", m.spec_decode_num_draft_tokens_total)
    assert m.spec_decode_num_accepted_tokens_total > 0.2 * m.spec_decode_num_draft_tokens_total > 20
    assert engine.block_manager.usage == 0
    for i, p in enumerate(prompts):
        assert done[str(i)].outputs[0].token_ids == generate(model, [p], max_tokens[i])[0], f"request {i}"


def test_no_compiles_after_warmup_with_a_head(model, trained_head):
    path, _ = trained_head
    engine = _engine(model, path, warmup=True, num_pages=48)
    rng = np.random.default_rng(5)
    with CompileCounter() as counter:
        for i in range(12):
            prompt = rng.integers(3, 250, int(rng.integers(1, 60))).tolist()
            engine.add_request(f"r{i}", {"prompt_token_ids": prompt},
                               SamplingParams(temperature=float(i % 2), max_tokens=int(rng.integers(1, 40)),
                                              ignore_eos=True))
            for _ in range(int(rng.integers(0, 4))):
                engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.metrics.spec_decode_num_accepted_tokens_total > 0
    assert counter.count == 0, f"{counter.count} compilations after warm-up"


def test_pack_sequences_windows_and_masks():
    tokens, mask = pack_sequences([[1, 2, 3, 4, 5], [6], [7, 8]], seq_len=3)
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [4, 5, 0], [7, 8, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 0], [1, 1, 0]])


def test_training_messages_never_hold_the_benchmark_passages():
    from importlib import resources

    from jaxinfer.bench.speculative import CHAT_QUESTIONS
    from jaxinfer.eagle_training import training_messages

    text = resources.files("jaxinfer.bench").joinpath("data/quality.txt").read_text()
    passages = [" ".join(p.split())[:80] for p in text.split("\n\n") if p.strip()]
    messages = training_messages()
    assert len(messages) > 300 and len(set(messages)) == len(messages)
    assert not any(p in m for p in passages for m in messages)
    assert not set(CHAT_QUESTIONS) & set(messages)


def test_train_eagle_command_writes_a_head_the_engine_loads(tmp_path):
    """`jaxinfer train-eagle` end to end on a tiny checkpoint with a chat template: data, the
    held-out split, training, the head's directory, which the engine then loads."""
    import json

    from jaxinfer.cli import main
    from jaxinfer.llm import LLM
    from tests.server_fixtures import write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "model")
    out = tmp_path / "head"
    assert main(["train-eagle", "--model", str(checkpoint), "--output", str(out), "--max-messages", "20",
                 "--repeats", "1", "--max-tokens", "8", "--steps", "2", "--batch-size", "4", "--seq-len", "64",
                 "--max-num-seqs", "8"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["sequences"] == 20 and record["held_out_sequences"] == 2  # messages 9 and 19
    assert "kept_step" in record["history"][-1]
    llm = LLM(str(checkpoint), speculative_config={"method": "eagle", "model": str(out), "num_speculative_tokens": 2},
              max_model_len=128, warmup=False)
    [result] = llm.generate(["hello"], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    assert len(result.outputs[0].token_ids) == 6


@pytest.mark.parametrize("kv_dtype, head_dim", [("bfloat16", None), ("float8_e4m3fn", None), ("float8_e4m3fn", 64)])
def test_pool_sizing_counts_the_head_and_the_features_by_their_bytes(model, kv_dtype, head_dim):
    """A page's bytes as sized cover the target's KV, the head's layer of KV and the bf16
    features of its tokens, whatever the cache's dtype and (padded) head size: with an fp8 cache
    the features take twice the bytes of a KV value each."""
    import jax.numpy as jnp

    from jaxinfer.engine.kv_cache import KVCacheSpec

    mc = model.config
    hd = head_dim or mc.head_dim
    config = EngineConfig(speculative_config={"method": "eagle", "model": "/unused", "num_speculative_tokens": 2})
    sizing = LLMEngine._sizing_config(config, mc, jnp.dtype(kv_dtype), hd, jnp.bfloat16)
    page = 16
    sized = KVCacheSpec.bytes_per_page(sizing, page, kv_dtype, hd)
    layer = 2 * mc.num_kv_heads * hd * page * jnp.dtype(kv_dtype).itemsize
    needed = (mc.num_layers + 1) * layer + page * mc.hidden_size * 2
    assert needed <= sized < needed + layer
