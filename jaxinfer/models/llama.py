"""Functional Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3).

The model is a pure function of a parameter pytree. Parameters are plain arrays named with
axis letters (glossary below); `param_axes` gives each one's logical axis names, which
`sharding/` maps to mesh axes, so sharding needs no change here.

Glossary: V vocab, D model width, N query heads, K kv heads, H head dim, F mlp width,
T tokens in the step (a flat, ragged batch).

Parameter tree:
  embed_vd                       [V, D]
  layers: list of dicts, one per layer:
    attn_norm_d                  [D]
    wq_dnh, wk_dkh, wv_dkh       [D, N, H], [D, K, H], [D, K, H]
    bq_nh, bk_kh, bv_kh          (qkv_bias) [N, H], [K, H], [K, H]
    q_norm_h, k_norm_h           (qk_norm) [H]
    wo_nhd                       [N, H, D]
    bo_d                         (o_bias) [D]
    mlp_norm_d                   [D]
    w_gate_df, w_up_df           [D, F]
    w_down_fd                    [F, D]
  final_norm_d                   [D]
  lm_head_vd                     [V, D] (absent when embeddings are tied)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig, rope_inv_freq
from jaxinfer.models.attention import AttentionBackend, LayerSpec

Params = dict[str, Any]

# Logical axis names; sharding/rules.py maps them to mesh axes.
VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP = "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp"


def layer_param_axes(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    axes = {
        "attn_norm_d": (EMBED,),
        "wq_dnh": (EMBED, HEADS, HEAD_DIM),
        "wk_dkh": (EMBED, KV_HEADS, HEAD_DIM),
        "wv_dkh": (EMBED, KV_HEADS, HEAD_DIM),
        "wo_nhd": (HEADS, HEAD_DIM, EMBED),
        "mlp_norm_d": (EMBED,),
        "w_gate_df": (EMBED, MLP),
        "w_up_df": (EMBED, MLP),
        "w_down_fd": (MLP, EMBED),
    }
    if config.qkv_bias:
        axes.update(bq_nh=(HEADS, HEAD_DIM), bk_kh=(KV_HEADS, HEAD_DIM), bv_kh=(KV_HEADS, HEAD_DIM))
    if config.o_bias:
        axes["bo_d"] = (EMBED,)
    if config.qk_norm:
        axes.update(q_norm_h=(HEAD_DIM,), k_norm_h=(HEAD_DIM,))
    return axes


def param_axes(config: ModelConfig) -> Params:
    """Logical axis names of every parameter, in the same tree structure as the parameters."""
    axes: Params = {
        "embed_vd": (VOCAB, EMBED),
        "layers": [layer_param_axes(config) for _ in range(config.num_layers)],
        "final_norm_d": (EMBED,),
    }
    if not config.tie_word_embeddings:
        axes["lm_head_vd"] = (VOCAB, EMBED)
    return axes


def param_shapes(config: ModelConfig) -> Params:
    """Shape of every parameter, in the parameter tree structure."""
    size = {VOCAB: config.vocab_size, EMBED: config.hidden_size, HEADS: config.num_heads,
            KV_HEADS: config.num_kv_heads, HEAD_DIM: config.head_dim, MLP: config.intermediate_size}
    return jax.tree.map(lambda axes: tuple(size[a] for a in axes), param_axes(config),
                        is_leaf=lambda x: isinstance(x, tuple))


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (for tests and benchmarks): normal(0, 0.02) weights, unit norms.

    One small jitted draw per leaf: an 8B model compiles a dozen tiny programs, not one huge one.
    """
    shapes = param_shapes(config)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)
    keys = jax.random.split(key, len(flat))
    out = []
    for (path, shape), k in zip(flat, keys):
        if "norm" in jax.tree_util.keystr(path):
            out.append(jnp.ones(shape, dtype))
        else:
            out.append(_normal(k, shape, jnp.dtype(dtype)))
    return jax.tree.unflatten(treedef, out)


def layer_specs(config: ModelConfig) -> tuple[LayerSpec, ...]:
    scale = config.head_dim ** -0.5
    return tuple(LayerSpec(index=i, scale=scale, sliding_window=w)
                 for i, w in enumerate(config.sliding_windows))


def rms_norm(x, weight, eps: float):
    # Normalize in float32, cast back, then scale: the order HF uses, which matters in bf16.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope(x_thh, positions_t, inv_freq):
    """Rotary embedding in the HF (rotate-half) layout: x [T, heads, H], positions [T]."""
    angles = positions_t.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    half = x_thh.shape[-1] // 2
    x1 = x_thh[..., :half].astype(jnp.float32)
    x2 = x_thh[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_thh.dtype)


def _attention_block(lp, x_td, positions_t, kv_cache, metadata, attention, config, layer, inv_freq):
    dt = x_td.dtype
    q = jnp.einsum("td,dnh->tnh", x_td, lp["wq_dnh"], preferred_element_type=dt)
    k = jnp.einsum("td,dkh->tkh", x_td, lp["wk_dkh"], preferred_element_type=dt)
    v = jnp.einsum("td,dkh->tkh", x_td, lp["wv_dkh"], preferred_element_type=dt)
    if config.qkv_bias:
        q, k, v = q + lp["bq_nh"], k + lp["bk_kh"], v + lp["bv_kh"]
    if config.qk_norm:
        q = rms_norm(q, lp["q_norm_h"], config.rms_norm_eps)
        k = rms_norm(k, lp["k_norm_h"], config.rms_norm_eps)
    q = rope(q, positions_t, inv_freq)
    k = rope(k, positions_t, inv_freq)
    o_tnh, kv_cache = attention(q, k, v, kv_cache, metadata, layer)
    out = jnp.einsum("tnh,nhd->td", o_tnh, lp["wo_nhd"], preferred_element_type=dt)
    if config.o_bias:
        out = out + lp["bo_d"]
    return out, kv_cache


def _mlp_block(lp, x_td):
    dt = x_td.dtype
    gate = jnp.einsum("td,df->tf", x_td, lp["w_gate_df"], preferred_element_type=dt)
    up = jnp.einsum("td,df->tf", x_td, lp["w_up_df"], preferred_element_type=dt)
    return jnp.einsum("tf,fd->td", jax.nn.silu(gate) * up, lp["w_down_fd"], preferred_element_type=dt)


def forward(params: Params, config: ModelConfig, token_ids_t, positions_t, kv_caches: list,
            metadata, attention: AttentionBackend):
    """Runs the decoder over a flat batch of tokens.

    Args:
      params: the parameter tree (see module docstring).
      config: static model configuration.
      token_ids_t: int32 [T] token ids.
      positions_t: int32 [T] positions (RoPE); padding tokens may carry any position.
      kv_caches: one cache pytree per layer, in the attention backend's layout.
      metadata: the attention backend's step metadata.
      attention: the attention backend (static).
    Returns:
      (hidden_td [T, D] after the final norm, updated kv_caches)
    """
    inv_freq = jnp.asarray(np.asarray(rope_inv_freq(config), np.float32))
    x = params["embed_vd"][token_ids_t]
    new_caches = []
    for lp, layer, cache in zip(params["layers"], layer_specs(config), kv_caches):
        h = rms_norm(x, lp["attn_norm_d"], config.rms_norm_eps)
        attn_out, cache = _attention_block(lp, h, positions_t, cache, metadata, attention, config,
                                           layer, inv_freq)
        x = x + attn_out
        x = x + _mlp_block(lp, rms_norm(x, lp["mlp_norm_d"], config.rms_norm_eps))
        new_caches.append(cache)
    return rms_norm(x, params["final_norm_d"], config.rms_norm_eps), new_caches


def compute_logits(params: Params, hidden_td):
    """Float32 logits [T, V] from final hidden states [T, D]."""
    head = params.get("lm_head_vd", params["embed_vd"])
    return jnp.einsum("td,vd->tv", hidden_td, head, preferred_element_type=jnp.float32)
