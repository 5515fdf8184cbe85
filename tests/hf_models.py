"""Tiny random HF transformers models, one per supported family: the parity oracle.

Weights are drawn with a larger init range than HF's default so that next-token
distributions are peaked and greedy decoding is decided by clear margins, not ties.
"""

from __future__ import annotations

import numpy as np

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, initializer_range=0.15, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)

# name -> (model_type, config overrides)
VARIANTS = {
    "llama": ("llama", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "llama3_rope_tied": ("llama", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "llama_attention_bias_mha": ("llama", dict(attention_bias=True, num_key_value_heads=4)),
    "mistral_sliding": ("mistral", dict(sliding_window=8, head_dim=16, tie_word_embeddings=False)),
    "qwen2_bias": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3_qknorm": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),
}


def build_hf_model(name: str, seed: int = 0, variants=None):
    """Builds a float32 HF model of the named variant (of `variants`, default VARIANTS) with
    fresh random weights."""
    import torch
    import transformers

    model_type, overrides = (VARIANTS if variants is None else variants)[name]
    config_cls = transformers.AutoConfig.for_model(model_type).__class__
    config = config_cls(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def random_prompts(seed: int, count: int, vocab: int, min_len: int = 3, max_len: int = 24):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(min_len, max_len + 1))).tolist()
            for _ in range(count)]


def hf_logits(model, prompt):
    import torch

    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float().numpy()


def hf_greedy(model, prompt, max_new_tokens):
    import torch

    with torch.no_grad():
        # No eos: the comparison runs the full length on both sides.
        model.generation_config.eos_token_id = None
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()
