"""Gemma 2, Gemma 3 (text) and Phi-3 against HF transformers on tiny random checkpoints (float32):
logits of the functional model, and greedy tokens through the engine on the XLA and the Pallas
(interpret mode) attention paths. Sliding windows are shorter than the sequences, so the
windowed layers see fewer keys than the global ones."""

import jax
import numpy as np
import pytest

from jaxinfer.config import ModelConfig, UnsupportedModelError
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.generate import prefill_logits
from jaxinfer.loading.hf_weights import hf_state_dict
from jaxinfer.loading.loader import LoadedModel, load_hf_directory
from jaxinfer.models import GemmaForCausalLM, LlamaForCausalLM, model_class
from jaxinfer.models.llama import layer_runs
from jaxinfer.sampling_params import SamplingParams
from tests.hf_models import hf_greedy, hf_logits, random_prompts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.15,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
S, F = "sliding_attention", "full_attention"

# name -> (HF model_type, config overrides, expected module class)
FAMILIES = {
    # Small caps so that soft-capping changes the numbers; query_pre_attn_scalar != head_dim.
    "gemma2": ("gemma2", dict(num_hidden_layers=4, sliding_window=6, query_pre_attn_scalar=24,
                              attn_logit_softcapping=4.0, final_logit_softcapping=12.0), GemmaForCausalLM),
    # Global layers rotate with a linearly scaled base, sliding ones with their own; a pattern
    # of three layers twice, then a partial one.
    "gemma3": ("gemma3_text", dict(num_hidden_layers=7, sliding_window=6, query_pre_attn_scalar=16,
                                   layer_types=[S, S, F, S, S, F, S],
                                   rope_parameters={F: dict(rope_type="linear", factor=4.0, rope_theta=1e6),
                                                    S: dict(rope_type="default", rope_theta=1e4)}),
               GemmaForCausalLM),
    # head_dim 96 (hidden 192 / 2 heads): a size the GPU kernel tiles only zero-padded.
    "phi3": ("phi3", dict(hidden_size=192, num_attention_heads=2, num_key_value_heads=1, head_dim=None,
                          intermediate_size=128, num_hidden_layers=2, sliding_window=10, tie_word_embeddings=False),
             LlamaForCausalLM),
}


def build_hf(name: str, seed: int = 0):
    import torch
    import transformers

    model_type, overrides, _ = FAMILIES[name]
    kwargs = {k: v for k, v in {**BASE, **overrides}.items() if v is not None}
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"  # soft-capping is implemented there
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    model = build_hf(name, seed=len(name))
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory, safe_serialization=True)
    config, host_params = load_hf_directory(directory)
    return name, model, config, host_params, LoadedModel(config, jax.device_put(host_params), None, directory)


def test_config_and_module(family):
    name, _, config, _, _ = family
    assert model_class(config) is FAMILIES[name][2]
    if name == "gemma2":
        assert config.sliding_windows == (6, None, 6, None)
        assert (config.attn_logit_softcap, config.final_logit_softcap) == (4.0, 12.0)
        assert config.attention_scale == 24 ** -0.5 and config.tie_word_embeddings
        assert [(a, b, len(p)) for a, b, p in layer_runs(config)] == [(0, 4, 2)]  # one scan of (sliding, global)
    elif name == "gemma3":
        assert config.sliding_windows == (6, 6, None, 6, 6, None, 6) and config.qk_norm
        assert (config.local_rope_theta, config.rope_theta, config.rope_scaling.factor) == (1e4, 1e6, 4.0)
        assert [(a, b, len(p)) for a, b, p in layer_runs(config)] == [(0, 6, 3), (6, 7, 1)]
    else:
        assert config.head_dim == 96 and config.sliding_windows == (10, 10)


def test_logits_match_hf(family):
    name, model, config, _, loaded = family
    for prompt in random_prompts(seed=1, count=3, vocab=config.vocab_size, min_len=8, max_len=20):
        ours = prefill_logits(loaded, prompt)
        ref = hf_logits(model, prompt)
        rel = np.abs(ours - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, f"{name}: max relative logit error {rel:.2e}"


def test_export_round_trips_hf_names(family):
    """hf_state_dict gives back the checkpoint's own tensors under its own names (Phi-3 fused)."""
    _, model, config, host_params, _ = family
    ours = hf_state_dict(config, host_params)
    theirs = {k: v.numpy() for k, v in model.state_dict().items() if k in ours or k != "lm_head.weight"}
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


ENGINE_PROMPTS = random_prompts(seed=2, count=3, vocab=BASE["vocab_size"], min_len=4, max_len=16)
_HF_TOKENS: dict[str, list[list[int]]] = {}  # per family: HF's 32 greedy tokens of each prompt


def torch_log_softmax(logits):
    import torch

    return torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()


def hf_tokens(name: str, model) -> list[list[int]]:
    if name not in _HF_TOKENS:
        _HF_TOKENS[name] = [hf_greedy(model, p, 32) for p in ENGINE_PROMPTS]
    return _HF_TOKENS[name]


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_engine_greedy_matches_hf(family, backend):
    """Three prompts batched: every request's 32 greedy tokens are HF's, and on the XLA path the
    first one's prompt logprobs are HF's (after Gemma 2's final soft-capping). Gemma 3 on the XLA
    path also runs chunked prefill and a pool small enough to preempt (each compiled bucket costs
    seconds here, so the other runs keep to few)."""
    name, model, _, _, loaded = family
    stress = name == "gemma3" and backend == "xla"
    engine_config = EngineConfig(max_model_len=48, max_num_seqs=4, max_num_batched_tokens=16 if stress else 64, page_size=4,
                          num_pages=14 if stress else 64, attention_backend=backend, compilation_cache_dir="",
                          warmup=False)
    engine = LLMEngine(loaded, engine_config, kv_fill=float("nan"))
    for i, p in enumerate(ENGINE_PROMPTS):
        scored = backend == "xla" and i == 0
        engine.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(
            temperature=0.0, max_tokens=32, ignore_eos=True, prompt_logprobs=0 if scored else None))
    done, prompt_logprobs = {}, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = list(out.outputs[0].token_ids)
                prompt_logprobs = out.prompt_logprobs if out.request_id == "0" else prompt_logprobs
    if stress:
        assert engine.scheduler.num_preemptions_total > 0, "the pool was meant to force preemption"
    if backend == "xla":
        p = ENGINE_PROMPTS[0]
        ref = torch_log_softmax(hf_logits(model, p))
        got = [prompt_logprobs[j][p[j]].logprob for j in range(1, len(p))]
        np.testing.assert_allclose(got, [ref[j - 1, p[j]] for j in range(1, len(p))], atol=1e-4)
    for i, (p, ref) in enumerate(zip(ENGINE_PROMPTS, hf_tokens(name, model))):
        assert done[i] == ref, f"{name}/{backend}: greedy tokens differ for {p}"


@pytest.mark.parametrize("field, value, message", [
    ("hidden_activation", "relu", "hidden_activation='relu'"),
    ("rope_scaling", {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "'longrope'"),
    ("partial_rotary_factor", 0.75, "partial_rotary_factor=0.75"),
    ("use_bidirectional_attention", True, "use_bidirectional_attention=True"),
])
def test_unsupported_fields_are_refused_by_name(field, value, message):
    hf = dict(model_type="phi3" if field != "hidden_activation" else "gemma2", vocab_size=160, hidden_size=64,
              intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, **{field: value})
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf_config(hf)


def test_gemma3_hub_config_fields_match_hf():
    """A config.json in the older Hub form (sliding_window_pattern, rope_local_base_freq,
    rope_scaling) reads as HF's config class reads it."""
    import transformers

    legacy = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=6, sliding_window_pattern=3, rope_theta=1e6,
                  rope_local_base_freq=2e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    ours = ModelConfig.from_hf_config(dict(model_type="gemma3_text", **legacy))
    hf = transformers.Gemma3TextConfig(**legacy)
    assert ours.sliding_windows == tuple(6 if t == S else None for t in hf.layer_types)
    assert ours.local_rope_theta == hf.rope_parameters[S]["rope_theta"]
    assert ours.rope_theta == hf.rope_parameters[F]["rope_theta"]
    assert (ours.rope_scaling.kind, ours.rope_scaling.factor) == ("linear", hf.rope_parameters[F]["factor"])
    assert ours.attention_scale == hf.query_pre_attn_scalar ** -0.5


def test_gemma2_minimal_config_takes_hf_defaults():
    import transformers

    minimal = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                   head_dim=16, sliding_window=6)
    ours = ModelConfig.from_hf_config(dict(model_type="gemma2", **minimal))
    hf = transformers.Gemma2Config(**minimal)
    assert ours.sliding_windows == tuple(6 if t == S else None for t in hf.layer_types)
    assert (ours.attn_logit_softcap, ours.final_logit_softcap) == (hf.attn_logit_softcapping,
                                                                   hf.final_logit_softcapping)
    assert ours.attention_scale == hf.query_pre_attn_scalar ** -0.5
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]


def test_gemma3_multimodal_config_is_refused():
    with pytest.raises(UnsupportedModelError, match="text_config"):
        ModelConfig.from_hf_config(dict(model_type="gemma3", text_config={}, vision_config={}))
