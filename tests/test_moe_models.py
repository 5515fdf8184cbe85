"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) against HF transformers on tiny
random checkpoints, and the grouped-matmul expert path against a dense float64 reference."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxinfer import LLM, SamplingParams
from jaxinfer.config import ModelConfig, UnsupportedModelError
from jaxinfer.generate import prefill_logits
from jaxinfer.loading.hf_weights import hf_state_dict
from jaxinfer.loading.loader import LoadedModel, load_hf_directory
from jaxinfer.models import MoeForCausalLM, model_class
from jaxinfer.models.moe import route, routed_experts
from tests.hf_models import build_hf_model, hf_greedy, hf_logits, random_prompts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# name -> (model_type, overrides of hf_models.TINY)
MOE_VARIANTS = {
    "mixtral_sliding": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=8)),
    "qwen2_moe_shared": ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=48, norm_topk_prob=False)),
    "qwen3_moe_qknorm": ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                           norm_topk_prob=True, head_dim=32, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=sorted(MOE_VARIANTS))
def hf_and_ours(request, tmp_path_factory):
    model = build_hf_model(request.param, seed=len(request.param), variants=MOE_VARIANTS)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory, safe_serialization=True)
    config, host_params = load_hf_directory(directory)
    return request.param, model, config, host_params, directory


def test_config_and_module_from_hf(hf_and_ours):
    name, model, config, _, _ = hf_and_ours
    assert model_class(config) is MoeForCausalLM
    overrides = MOE_VARIANTS[name][1]
    assert config.num_experts == overrides.get("num_local_experts", overrides.get("num_experts"))
    assert config.num_experts_per_tok == 2
    assert config.norm_topk_prob == (name != "qwen2_moe_shared")
    assert config.shared_expert_intermediate_size == (48 if name == "qwen2_moe_shared" else 0)
    assert config.num_params() == sum(p.numel() for p in model.parameters())


def test_logits_match_hf(hf_and_ours):
    name, model, config, host_params, directory = hf_and_ours
    params = LoadedModel(config, jax.device_put(host_params), None, directory)
    for prompt in random_prompts(seed=1, count=2, vocab=config.vocab_size, max_len=20):
        ref = hf_logits(model, prompt)
        rel = np.abs(prefill_logits(params, prompt) - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, f"{name}: max relative logit error {rel:.2e}"


def test_engine_batched_greedy_matches_hf(hf_and_ours):
    name, model, config, host_params, directory = hf_and_ours
    llm = LLM(LoadedModel(config, jax.device_put(host_params), None, directory), max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=32, page_size=8, num_pages=40, compilation_cache_dir="",
              warmup=False)  # compile only the buckets this run meets
    prompts = random_prompts(seed=2, count=4, vocab=config.vocab_size, max_len=12)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, 32), f"{name}: greedy tokens differ for {prompt}"


def test_export_gives_back_hf_state_dict(hf_and_ours):
    _, _, config, host_params, directory = hf_and_ours
    ours = hf_state_dict(config, host_params)
    # The checkpoint's names, one tensor per expert, as transformers writes them.
    ref = load_file(directory / "model.safetensors")
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def _dense_reference(x, logits, k, normalize, w_gate_up, w_down):
    """Every expert on every token in float64, masked to each token's top k: the definition."""
    x, logits, w_gate_up, w_down = (np.asarray(a, np.float64) for a in (x, logits, w_gate_up, w_down))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :k]
    weights = np.zeros_like(probs)
    np.put_along_axis(weights, top, np.take_along_axis(probs, top, -1), -1)
    if normalize:
        weights /= weights.sum(-1, keepdims=True)
    gate = np.einsum("td,xdf->txf", x, w_gate_up[:, :, 0])
    up = np.einsum("td,xdf->txf", x, w_gate_up[:, :, 1])
    expert_out = np.einsum("txf,xfd->txd", gate / (1 + np.exp(-gate)) * up, w_down)
    return np.einsum("tx,txd->td", weights, expert_out)


@pytest.mark.parametrize("tokens,experts,k,normalize", [(1, 4, 1, False), (7, 8, 2, True), (33, 6, 3, False),
                                                        (16, 8, 8, True)])
def test_ragged_experts_match_dense_reference(tokens, experts, k, normalize):
    rng = np.random.default_rng(tokens * 100 + experts)
    d, f = 24, 40
    x = rng.normal(size=(tokens, d)).astype(np.float32)
    # Skewed router logits: some experts get no token at all (empty groups).
    logits = (rng.normal(size=(tokens, experts)) * 3 + np.linspace(0, 4, experts)).astype(np.float32)
    w_gate_up = (rng.normal(size=(experts, d, 2, f)) * 0.2).astype(np.float32)
    w_down = (rng.normal(size=(experts, f, d)) * 0.2).astype(np.float32)
    weights, chosen = route(jnp.asarray(logits), k, normalize)
    got = jax.jit(routed_experts)(jnp.asarray(x), weights, chosen, jnp.asarray(w_gate_up), jnp.asarray(w_down))
    ref = _dense_reference(x, logits, k, normalize, w_gate_up, w_down)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def _hf_config(**overrides):
    base = dict(model_type="qwen2_moe", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    return {**base, **overrides}


@pytest.mark.parametrize("field,value", [("decoder_sparse_step", 2), ("mlp_only_layers", [0])])
def test_dense_layers_among_sparse_are_refused(field, value):
    with pytest.raises(UnsupportedModelError, match=field):
        ModelConfig.from_hf_config(_hf_config(**{field: value}))


def test_missing_or_inconsistent_expert_fields_are_refused():
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        ModelConfig.from_hf_config({k: v for k, v in _hf_config().items() if k != "moe_intermediate_size"})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_hf_config(_hf_config(num_experts_per_tok=5))


def test_weight_quantization_is_refused():
    from jaxinfer.models import abstract_model
    from jaxinfer.quantization import quantize_params

    # (refused before any weight is read: the abstract state suffices)
    _, state = abstract_model(ModelConfig.from_hf_config(_hf_config()))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        quantize_params(state, "int8")


# -- expert parallelism on a simulated 8-device CPU mesh, in a subprocess ----------------------
# (tensor_parallel_size, enable_expert_parallel): each run's greedy tokens against one device.
EP_RUNS = ((8, True),)


def _random_moe_model(num_experts: int = 8):
    from flax import nnx

    from jaxinfer.models import create_model
    from tests.engine_fixtures import peaked

    config = ModelConfig.from_hf_config(_hf_config(
        vocab_size=256, hidden_size=64, num_attention_heads=8, num_key_value_heads=4, num_experts=num_experts,
        moe_intermediate_size=16, shared_expert_intermediate_size=32, eos_token_id=2))
    graphdef, state = nnx.split(create_model(config, seed=1))
    return LoadedModel(config=config, params=peaked(state), tokenizer=None, path=Path("."), graphdef=graphdef)


def _ep_engine_main():
    """Runs in the subprocess: every run of EP_RUNS against the one-device reference loop."""
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import LLMEngine
    from jaxinfer.generate import generate

    assert jax.device_count() == 8, jax.devices()
    prompts = [[5, 6, 7, 8, 9], list(range(3, 16)), [40] * 3]
    reference = generate(_random_moe_model(), prompts, 8)

    def engine(tp, ep, num_experts=8):
        return LLMEngine(_random_moe_model(num_experts), EngineConfig(
            tensor_parallel_size=tp, enable_expert_parallel=ep, max_num_seqs=4, max_num_batched_tokens=32,
            page_size=8, num_pages=24, max_model_len=64, compilation_cache_dir="", warmup=False))

    for tp, ep in EP_RUNS:
        e = engine(tp, ep)
        # Whole experts on each device with ep; each expert's mlp width split without.
        want = (None, "tp", None, None, None) if ep else (None, None, None, None, "tp")
        assert tuple(e.model.params["layers"]["w_expert_gate_up"].get_value().sharding.spec) == want
        assert (_merged_module(e).expert_mesh is not None) == ep
        for i, p in enumerate(prompts):
            e.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        done = {}
        while len(done) < len(prompts):
            done.update((o.request_id, o) for o in e.step() if o.finished)
        tokens = [done[str(i)].outputs[0].token_ids for i in range(len(prompts))]
        assert tokens == reference, (tp, ep, tokens, reference)
        print(f"tp={tp} ep={ep} ok", flush=True)
    try:
        engine(4, True, num_experts=6)
    except ValueError as e:
        assert "num_experts=6" in str(e), e
        print("uneven experts refused", flush=True)


def _merged_module(engine):
    from flax import nnx

    return nnx.merge(engine.model.graphdef, engine.model.params)


def test_enable_expert_parallel_needs_experts():
    from types import SimpleNamespace

    from jaxinfer.config import preset
    from jaxinfer.engine.engine import LLMEngine

    with pytest.raises(ValueError, match="enable_expert_parallel"):
        LLMEngine._place_on_mesh(SimpleNamespace(config=preset("tiny")), 1, expert_parallel=True)


def test_expert_parallel_engine_matches_one_device():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()}
    main = "from tests.test_moe_models import _ep_engine_main; _ep_engine_main()"
    proc = subprocess.run([sys.executable, "-c", main],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    want = [f"tp={tp} ep={ep} ok" for tp, ep in EP_RUNS] + ["uneven experts refused"]
    assert proc.stdout.split("\n")[-len(want) - 1:-1] == want, proc.stdout


def test_expert_parallel_flag_reaches_the_engine_config():
    from jaxinfer.cli import build_parser, engine_config_kwargs
    from jaxinfer.engine.config import EngineConfig

    args = build_parser().parse_args(["generate", "--tensor-parallel-size", "8", "--enable-expert-parallel"])
    assert EngineConfig(**engine_config_kwargs(args)).enable_expert_parallel
    assert not EngineConfig(**engine_config_kwargs(build_parser().parse_args(["generate"]))).enable_expert_parallel
