"""Gemma 2 and Gemma 3 (text) decoders: the Llama-family decoder of models/llama.py with
Gemma's numerics.

What differs from Llama, and where it lives:
  * RMSNorm scales by (1 + weight), in float32 before the cast back (`gemma_rms_norm`); it
    normalizes the inputs of attention and the MLP, their outputs too (the post norms, which
    llama.py's layer applies when the weights exist), the final hidden states and, in Gemma 3,
    each head of q and k.
  * Embeddings are multiplied by sqrt(hidden_size), rounded to the parameter dtype as HF does.
  * The MLP is GeGLU: gelu (tanh approximation) of the gate times up.
  * Attention logits are scaled by query_pre_attn_scalar ** -0.5 and, in Gemma 2, soft-capped
    (cap * tanh(x / cap)); sliding-window layers alternate with global ones, and in Gemma 3 the
    sliding ones rotate with their own rope base. These are config fields that llama.py's
    `layer_runs` turns into per-layer attention settings: the layers run as one scan over the
    repeating pattern.
  * The output logits are soft-capped (Gemma 2's final_logit_softcapping).

Parameters beyond llama.py's (no biases):
  layers.post_attn_norm [L, D]   (HF post_attention_layernorm; llama.py's mlp_norm is HF's
  layers.post_mlp_norm  [L, D]    pre_feedforward_layernorm here, see loading/hf_weights.py)
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import GEMMA_TYPES, ModelConfig
from jaxinfer.models.linear import XLA_LINEAR, Linear
from jaxinfer.models.llama import EMBED, LAYER_PARAMS, LAYERS, DecoderLayers, LlamaForCausalLM, _Init
from pallas_kernels.rms_norm import rms_norm_ordered

GEMMA_LAYER_PARAMS = ("post_attn_norm", "post_mlp_norm")


class GemmaDecoderLayers(DecoderLayers):
    """llama.py's stacked layer weights plus the norms of the attention and MLP outputs."""

    def __init__(self, config: ModelConfig, init: _Init):
        super().__init__(config, init)
        L, D = config.num_layers, config.hidden_size
        self.post_attn_norm = init.ones((L, D), (LAYERS, EMBED))
        self.post_mlp_norm = init.ones((L, D), (LAYERS, EMBED))


class GemmaForCausalLM(LlamaForCausalLM):
    """A Gemma 2 or Gemma 3 text decoder and its (tied) LM head; arguments and step interface
    as LlamaForCausalLM."""

    layer_params = LAYER_PARAMS + GEMMA_LAYER_PARAMS
    norm_kind = "gemma"
    mlp_activation = "gelu_tanh"  # GeGLU: down(gelu_tanh(gate) * up)

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if config.model_type not in GEMMA_TYPES:
            raise ValueError(f"model type {config.model_type!r} is not a Gemma; use models.model_class")
        super().__init__(config, dtype=dtype, rngs=rngs)

    def _make_layers(self, config: ModelConfig, init: _Init) -> nnx.Module:
        return GemmaDecoderLayers(config, init)

    def embed_tokens(self, token_ids_t):
        x = super().embed_tokens(token_ids_t)
        return x * jnp.asarray(self.config.hidden_size ** 0.5, x.dtype)

    def norm(self, x, weight):
        return gemma_rms_norm(x, weight, self.config.rms_norm_eps)

    def compute_logits(self, hidden_td, linear: Linear = XLA_LINEAR):
        return softcap(super().compute_logits(hidden_td, linear), self.config.final_logit_softcap)


def gemma_rms_norm(x, weight, eps: float):
    # Gemma scales by (1 + weight) in float32 and casts once at the end (Llama casts before
    # scaling): the order matters in bfloat16.
    return rms_norm_ordered(x, weight, eps, "gemma")


def softcap(logits, cap: float | None):
    """cap * tanh(logits / cap): bounds logits smoothly to (-cap, cap); None leaves them."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)
