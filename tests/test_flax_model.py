"""The model as a Flax NNX module: built by user code, run through `LLM`, checked against HF.

A user builds the module themselves (no checkpoint), changes its weights as a fine-tune would,
and hands it to `LLM`; the HF model that receives the same weights (through the exporter) is
the reference. Also: export and import invert each other, parameters carry their logical axes,
and every way of running the layers (scanned, unrolled, CPU hybrid; XLA dots or the Pallas
skinny-matmul kernel in interpret mode) gives the reference loop's tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jaxinfer import LLM, SamplingParams
from jaxinfer.config import ModelConfig
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.generate import generate
from jaxinfer.loading.hf_weights import hf_state_dict, params_from_hf
from jaxinfer.models import LlamaForCausalLM, param_value
from jaxinfer.sharding.rules import logical_axes
from tests.engine_fixtures import tiny_model
from tests.hf_models import hf_greedy, hf_logits, random_prompts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIG = ModelConfig(model_type="qwen2", vocab_size=160, hidden_size=64, intermediate_size=96, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                     max_position_embeddings=256, qkv_bias=True, eos_token_ids=(2,))


def _user_model() -> LlamaForCausalLM:
    """What user code does: build the module, then change its weights (a stand-in fine-tune)."""
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(11))
    key = jax.random.PRNGKey(5)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and "norm" not in str(path):
            key, sub = jax.random.split(key)
            value = param_value(var)
            var[...] = value * 6 + 0.01 * jax.random.normal(sub, value.shape, value.dtype)
    return model


def _hf_twin(model):
    import torch
    import transformers

    c = model.config
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=False, use_sliding_window=False, attn_implementation="eager"))
    state = hf_state_dict(c, nnx.to_pure_dict(nnx.state(model)))
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return hf.eval()


@pytest.fixture(scope="module")
def user_model_and_hf():
    model = _user_model()
    return model, _hf_twin(model)


def test_user_built_module_runs_through_llm_and_matches_hf(user_model_and_hf):
    model, hf = user_model_and_hf
    prompts = random_prompts(seed=3, count=4, vocab=CONFIG.vocab_size)
    llm = LLM(model, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, page_size=8, num_pages=64,
              compilation_cache_dir="")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 16)
    # The module's own forward agrees with HF's logits too.
    from jaxinfer.generate import prefill_logits

    ours, ref = prefill_logits(model, prompts[0]), hf_logits(hf, prompts[0])
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_export_and_import_invert_each_other(user_model_and_hf):
    model, _ = user_model_and_hf
    tree = nnx.to_pure_dict(nnx.state(model))
    state = hf_state_dict(CONFIG, tree)
    back = params_from_hf(CONFIG, state.__getitem__, set(state))
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_parameters_carry_logical_axes():
    _, state = nnx.split(LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0)))
    specs = logical_axes(state)
    assert param_value(specs["layers"]["w_qkv"]) == PartitionSpec("layers", "embed", "kv_heads", None, "head_dim")
    assert param_value(specs["layers"]["w_gate_up"]) == PartitionSpec("layers", "embed", None, "mlp")
    assert param_value(specs["layers"]["w_down"]) == PartitionSpec("layers", "mlp", "embed")
    assert param_value(specs["embed"]) == PartitionSpec("vocab", "embed")


def test_module_rejects_foreign_objects():
    class NotAFamily(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(3))

    with pytest.raises(ValueError, match="ModelConfig"):
        LLM(NotAFamily())


LOOP_PROMPTS = [[5, 9, 33], list(range(3, 20)), [200]]


def _loop_engine(model, **kw):
    return LLMEngine(model, EngineConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, page_size=4,
                                         num_pages=48, compilation_cache_dir="", warmup=False, **kw),
                     kv_fill=float("nan"))


def _greedy_tokens(engine):
    for i, p in enumerate(LOOP_PROMPTS):
        engine.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(temperature=0.0, max_tokens=6,
                                                                          ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    return [done[str(i)] for i in range(len(LOOP_PROMPTS))]


@pytest.mark.parametrize("scan_layers,linear_kernel,scan_unroll", [
    (True, "xla", 1), (False, "xla", 1), (None, "xla", 1), (True, "pallas", 1), (None, "pallas", 1),
    (True, "xla", 3)])
def test_layer_loops_and_linear_kernels_match_reference(scan_layers, linear_kernel, scan_unroll):
    """Scanned, unrolled and the CPU hybrid (one-token steps unrolled over views of the stacked
    weights), with XLA dots or the Pallas skinny matmul (interpret mode), and a scan running
    three layers an iteration (which does not divide the layers): the reference's tokens."""
    model = tiny_model(seed=2)
    assert model.config.num_layers % 3
    engine = _loop_engine(model, scan_layers=scan_layers, linear_kernel=linear_kernel, scan_unroll=scan_unroll)
    assert _greedy_tokens(engine) == generate(model, LOOP_PROMPTS, 6)


@pytest.mark.parametrize("linear_kernel", ["xla", "pallas"])
def test_small_steps_unrolled_over_stacked_weights_match_reference(linear_kernel):
    """Steps of up to `ModelRunner.unroll_max_tokens` tokens unrolled over the stacked weights,
    larger ones scanned (measured faster on the H200 but slower to load; off by default)."""
    model = tiny_model(seed=2)
    engine = _loop_engine(model, scan_layers=True, linear_kernel=linear_kernel)
    engine.runner.unroll_max_tokens = 4
    step, loops = engine.runner._step, set()

    def recording_step(*args, unroll, **kw):
        loops.add(unroll)
        return step(*args, unroll=unroll, **kw)

    engine.runner._step = recording_step
    assert _greedy_tokens(engine) == generate(model, LOOP_PROMPTS, 6)
    assert loops == {True, False}  # unrolled small steps, scanned prefill chunks


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_scan_unroll_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="scan_unroll"):
        EngineConfig(scan_unroll=bad)


def test_random_model_is_create_model_compiled():
    """The benchmarks' one-program random init gives create_model's weights (to rounding) and
    the abstract model's graph definition."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxinfer.config import preset
    from jaxinfer.models import create_model, random_model

    config = preset("tiny")
    graphdef, state = random_model(config, dtype=jnp.float32, seed=1)
    eager_graphdef, eager = nnx.split(create_model(config, dtype=jnp.float32, seed=1))
    assert graphdef == eager_graphdef
    for (path, a), (path2, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(eager)):
        assert path == path2
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-6, atol=1e-8)
