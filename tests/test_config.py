"""ModelConfig from HF config.json: fields, RoPE scaling against HF's own functions, errors."""

import numpy as np
import pytest

from jaxinfer.config import ModelConfig, RopeScaling, UnsupportedModelError, preset, rope_inv_freq

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", factor=4.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
])
def test_rope_scaling_matches_hf(rope):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(**BASE, head_dim=32, max_position_embeddings=131072, rope_theta=500000.0,
                                  rope_scaling=rope)
    ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf)
    ours = rope_inv_freq(ModelConfig.from_hf_config(hf.to_dict()))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)


def test_fields_from_qwen3_config():
    import transformers

    hf = transformers.Qwen3Config(**BASE, head_dim=48, tie_word_embeddings=True, eos_token_id=[5, 6])
    c = ModelConfig.from_hf_config(hf.to_dict())
    assert (c.model_type, c.head_dim, c.qk_norm, c.qkv_bias, c.tie_word_embeddings) == ("qwen3", 48, True, False, True)
    assert c.eos_token_ids == (5, 6) and c.q_per_kv == 2 and c.sliding_windows == (None,) * 3


def test_qwen2_sliding_window_per_layer():
    c = ModelConfig.from_hf_config({**BASE, "model_type": "qwen2", "use_sliding_window": True,
                                    "sliding_window": 16, "max_window_layers": 1})
    assert c.sliding_windows == (None, 16, 16) and c.qkv_bias
    c = ModelConfig.from_hf_config({**BASE, "model_type": "qwen2", "sliding_window": 16})
    assert c.sliding_windows == (None,) * 3


def test_model_type_from_architectures_and_errors():
    c = ModelConfig.from_hf_config({**BASE, "architectures": ["MistralForCausalLM"]})
    assert c.model_type == "mistral"
    with pytest.raises(UnsupportedModelError, match="supports model types"):
        ModelConfig.from_hf_config({**BASE, "model_type": "falcon"})
    with pytest.raises(UnsupportedModelError, match="rope scaling type 'yarn'"):
        ModelConfig.from_hf_config({**BASE, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2}})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf_config({**BASE, "model_type": "llama", "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="must be positive"):
        preset("tiny", hidden_size=0)
    with pytest.raises(ValueError, match="rope scaling factor"):
        RopeScaling(kind="linear", factor=0)


def test_param_count_of_llama3_8b_preset():
    assert preset("llama3-8b").num_params() == 8_030_261_248
