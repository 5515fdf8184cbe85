"""EAGLE draft heads: one decoder layer that guesses the target model's next feature.

EAGLE (Li et al., 2024) drafts from the target's own features: for a position p it takes the
target's final hidden state f_p (after the final norm: what the LM head reads) and the
embedding of the token at p + 1, mixes them with `fc`, runs one decoder layer over them and
returns f'_{p+1}, a guess of the target's next feature; the target's LM head turns it into the
distribution of the token at p + 2. Chained, the head reads its own guess in place of f:

    f'_{p+1} = layer(fc([embed(x_{p+1}), f_p]))      x'_{p+2} = argmax(lm_head(f'_{p+1}))

The layer is the Llama decoder layer without its input norm (the published EAGLE layout); its
KV lives in a paged pool of its own, one layer deep, read by the engine's attention backend
(engine/eagle_proposer.py). The embedding and LM head are the target's.

Host-side weights follow the published checkpoint layout (loading/eagle.py); the module holds
them as the Llama module does (q|k|v fused by kv head, layers stacked on a leading axis of one),
so the model's own `_decoder_layer` runs it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.config import ModelConfig, rope_inv_freq
from jaxinfer.models.attention import AttentionBackend, LayerSpec
from jaxinfer.models.linear import XLA_LINEAR, Linear
from jaxinfer.models.llama import (EMBED, LAYER_PARAMS, DecoderLayers, LlamaForCausalLM, _decoder_layer, _Init,
                                   _param, param_value, rope_tables)


def head_config(target: ModelConfig, *, intermediate_size: int | None = None) -> ModelConfig:
    """The head's config: the target's attention shape, one layer, full attention."""
    return dataclasses.replace(target, num_layers=1, sliding_windows=(None,),
                               intermediate_size=intermediate_size or target.intermediate_size)


class _LayerHost:
    """What `_decoder_layer` asks of a model (config, norms, MLP), for the head's one layer."""

    norm_kind = LlamaForCausalLM.norm_kind
    mlp_activation = LlamaForCausalLM.mlp_activation
    norm = LlamaForCausalLM.norm
    mlp = LlamaForCausalLM.mlp

    def __init__(self, config: ModelConfig):
        self.config = config


class EagleHead(nnx.Module):
    """The draft head's parameters and its forward pass.

    Args:
      config: the head's config (`head_config`): one layer of the target's attention shape.
      fc_bias: whether `fc` has a bias (EAGLE's first heads do).
      dtype: parameter dtype.
      rngs: random streams for the initial weights (training from scratch, tests).
    """

    def __init__(self, config: ModelConfig, *, fc_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        if config.num_layers != 1:
            raise ValueError(f"an EAGLE head has one decoder layer, got {config.num_layers}")
        self.config = config
        init = _Init(rngs, dtype)
        d = config.hidden_size
        self.fc = init.normal((2 * d, d), (None, EMBED))  # input: [embedding, feature]
        self.fc_bias = _param(jnp.zeros((d,), init.dtype), (EMBED,)) if fc_bias else None
        self.layers = DecoderLayers(config, init)

    def __call__(self, embeds_td, features_td, positions_t, kv_cache, metadata, attention: AttentionBackend,
                 linear: Linear = XLA_LINEAR):
        """Guesses of the next features [T, D] for tokens laid out as the attention backend's
        metadata says: row t pairs the embedding of token x_{p+1} with the feature f_p, at
        position p (RoPE and the KV slot). Returns (guesses, updated kv_cache)."""
        c = self.config
        dtype = embeds_td.dtype
        mixed = jnp.concatenate([embeds_td, features_td.astype(dtype)], axis=-1)
        x = jnp.dot(mixed, param_value(self.fc), preferred_element_type=jnp.float32)
        if self.fc_bias is not None:
            x = x + param_value(self.fc_bias).astype(jnp.float32)
        x = x.astype(dtype)
        w = {name: param_value(getattr(self.layers, name)) for name in LAYER_PARAMS}
        # The layer's output is the guess itself, not normed: `next_norm` only feeds the fused
        # add-and-norm, whose normed half is unused.
        w["next_norm"] = jnp.ones((1, c.hidden_size), dtype)
        spec = LayerSpec(scale=c.attention_scale, sliding_window=None, logit_softcap=c.attn_logit_softcap)
        ropes = rope_tables(positions_t, jnp.asarray(np.asarray(rope_inv_freq(c), np.float32)))
        kv = attention.open_step(kv_cache, x.shape[0])
        # No input norm: the head's layer attends over the mixed vector as it is.
        x, _, kv = _decoder_layer(_LayerHost(c), w, 0, spec, x, x, ropes, kv, metadata, attention, linear)
        return x, attention.close_step(kv, metadata)


def create_head(target: ModelConfig, *, fc_bias: bool = True, dtype=jnp.float32, seed: int = 0,
                intermediate_size: int | None = None) -> EagleHead:
    """A head with random weights for the target's shape (training starts here)."""
    return EagleHead(head_config(target, intermediate_size=intermediate_size), fc_bias=fc_bias, dtype=dtype,
                     rngs=nnx.Rngs(seed))


def head_dtype(head_state) -> jnp.dtype:
    return jnp.dtype(param_value(head_state["fc"]).dtype)

