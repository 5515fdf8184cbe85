"""Llama-family decoder as a Flax NNX module (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3;
the base of models/gemma.py and models/moe.py).

Built for decode speed: q|k|v is one weight and gate|up another, so a layer runs four
projections, not seven; every layer's weights are stacked on a leading axis and the layers run
in `lax.scan` (one compiled layer body, a handful of arrays per step instead of hundreds).
Every projection goes through the `Linear` hook (models/linear.py). Parameters carry their
logical axis names as Flax sharding metadata; `sharding/` maps them to mesh
axes. The engine splits the module once into graph definition and state and jits its step as a
pure function of the state (`nnx.merge` inside the step).

Glossary: V vocab, D model width, N query heads, K kv heads, G = N / K query heads per kv
head, E = G + 2 (a kv head's G queries, its key and its value), H head dim, F mlp width,
L layers, T tokens in the step (a flat, ragged batch).

Parameters:
  embed            [V, D]            (vocab, embed)
  layers.attn_norm [L, D]
  layers.w_qkv     [L, D, K, E, H]   grouped by kv head, so tensor parallelism splits K
  layers.b_qkv     [L, K, E, H]      (qkv_bias)
  layers.q_norm    [L, H], layers.k_norm [L, H]  (qk_norm)
  layers.w_o       [L, N, H, D]
  layers.b_o       [L, D]            (o_bias)
  layers.mlp_norm  [L, D]
  layers.w_gate_up [L, D, 2, F]      gate and up side by side, so tensor parallelism splits F
  layers.w_down    [L, F, D]
  final_norm       [D]
  lm_head          [V, D]            (absent when embeddings are tied)
"""

from __future__ import annotations

import itertools

import jax
import flax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxinfer.config import ModelConfig, rope_inv_freq
from jaxinfer.models.attention import AttentionBackend, LayerSpec
from jaxinfer.models.linear import XLA_LINEAR, Linear, select_layer
from pallas_kernels.rms_norm import finish_partials, rms_norm_ordered
from pallas_kernels.rope_kv_write import rotate_half_rope

# Logical axis names; sharding/rules.py maps them to mesh axes.
LAYERS, VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP = "layers", "vocab", "embed", "heads", "kv_heads", \
    "head_dim", "mlp"


def _sharding_metadata_key() -> str:
    """Flax's name for a variable's logical axes: `out_sharding` from 0.12, `sharding_names` before."""
    major, minor = (int(p) for p in flax.__version__.split(".")[:2])
    return "out_sharding" if (major, minor) >= (0, 12) else "sharding_names"


_SHARDING_KEY = _sharding_metadata_key()


def _param(value, axes: tuple[str | None, ...]) -> nnx.Param:
    # Eager sharding off: a model is built on one device (or abstractly) and placed afterwards
    # by the rules table, which also knows when a dimension does not split.
    return nnx.Param(value, eager_sharding=False, **{_SHARDING_KEY: axes})


def param_value(var: nnx.Param | None):
    """The value of a parameter (None stays None); `get_value` where Flax has it."""
    if var is None:
        return None
    return var.get_value() if hasattr(var, "get_value") else var.value


class _Init:
    """Random weights normal(0, 0.02), norms one: for tests and benchmarks."""

    def __init__(self, rngs: nnx.Rngs, dtype):
        self.rngs, self.dtype = rngs, jnp.dtype(dtype)

    def normal(self, shape, axes):
        return _param((0.02 * jax.random.normal(self.rngs.params(), shape, jnp.float32)).astype(self.dtype), axes)

    def ones(self, shape, axes):
        return _param(jnp.ones(shape, self.dtype), axes)


LAYER_PARAMS = ("attn_norm", "w_qkv", "b_qkv", "q_norm", "k_norm", "w_o", "b_o", "mlp_norm", "w_gate_up", "w_down")


class DecoderLayers(nnx.Module):
    """Every decoder layer, weights stacked on a leading layer axis."""

    def __init__(self, config: ModelConfig, init: _Init, dense_mlp: bool = True):
        c = config
        L, D, K, H, F = c.num_layers, c.hidden_size, c.num_kv_heads, c.head_dim, c.intermediate_size
        E = c.q_per_kv + 2
        self.attn_norm = init.ones((L, D), (LAYERS, EMBED))
        self.w_qkv = init.normal((L, D, K, E, H), (LAYERS, EMBED, KV_HEADS, None, HEAD_DIM))
        self.b_qkv = init.normal((L, K, E, H), (LAYERS, KV_HEADS, None, HEAD_DIM)) if c.qkv_bias else None
        self.q_norm = init.ones((L, H), (LAYERS, HEAD_DIM)) if c.qk_norm else None
        self.k_norm = init.ones((L, H), (LAYERS, HEAD_DIM)) if c.qk_norm else None
        self.w_o = init.normal((L, c.num_heads, H, D), (LAYERS, HEADS, HEAD_DIM, EMBED))
        self.b_o = init.normal((L, D), (LAYERS, EMBED)) if c.o_bias else None
        self.mlp_norm = init.ones((L, D), (LAYERS, EMBED))
        # (mixture-of-experts models bring their own MLP weights: models/moe.py)
        self.w_gate_up = init.normal((L, D, 2, F), (LAYERS, EMBED, None, MLP)) if dense_mlp else None
        self.w_down = init.normal((L, F, D), (LAYERS, MLP, EMBED)) if dense_mlp else None


class LlamaForCausalLM(nnx.Module):
    """The decoder and its LM head.

    Args:
      config: the model configuration.
      dtype: parameter dtype.
      rngs: random streams for the initial weights (tests, benchmarks, training from scratch);
        checkpoint loading builds the module abstractly and fills the state instead.

    How the layers run follows the form of the layer weights: stacked arrays run in `lax.scan`
    over runs of layers that repeat a pattern of attention settings (see `layer_runs`); per-layer
    arrays (tuples, see `models.unstack_layers`) run unrolled, each projection on its own layer's
    array. The second form compiles slower but spares XLA's CPU backend a copy of every layer's
    weights that it makes when a dot reads a dynamic slice of a stack (measured: 30% of a decode
    step).
    """

    # The stacked layer parameters `__call__` hands to each layer (subclasses add their own).
    layer_params = LAYER_PARAMS
    # How `norm` orders its float32 and dtype steps (pallas_kernels/rms_norm's `kind`), and
    # the gated MLP's activation (`Linear.gated`).
    norm_kind = "llama"
    mlp_activation = "silu"

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        init = _Init(rngs, dtype)
        D = config.hidden_size
        self.embed = init.normal((config.vocab_size, D), (VOCAB, EMBED))
        self.layers = self._make_layers(config, init)
        self.final_norm = init.ones((D,), (EMBED,))
        self.lm_head = None if config.tie_word_embeddings else init.normal((config.vocab_size, D), (VOCAB, EMBED))

    def __call__(self, token_ids_t, positions_t, kv_cache, metadata, attention: AttentionBackend,
                 linear: Linear = XLA_LINEAR, unroll: bool | int = False):
        """Runs the decoder over a flat batch of tokens.

        Args:
          token_ids_t: int32 [T] token ids.
          positions_t: int32 [T] positions (RoPE); padding tokens may carry any position.
          kv_cache: the attention backend's cache of every layer (leading layer axis).
          metadata: the attention backend's step metadata.
          attention: the attention backend (static).
          linear: the projection hook (static).
          unroll: True: run stacked layers in a Python loop (each layer's index a constant)
            instead of `lax.scan`: no loop counter, no dynamic slices, fewer kernels; slower to
            compile. False or an int k: the scan runs k layers (patterns) per iteration
            (lax.scan's unroll; False is 1): 1/k of the loop's counter updates and carry copies,
            k bodies to compile.
        Returns:
          (hidden_td [T, D] after the final norm, updated kv_cache)
        """
        c = self.config
        x = self.embed_tokens(token_ids_t)
        weights = {name: param_value(getattr(self.layers, name)) for name in self.layer_params}
        runs = layer_runs(c)
        # Rotary tables once per step (not once per layer): sliding-window layers may rotate
        # with their own base (Gemma 3), so one table per kind in use.
        kinds = {spec.sliding_window is not None for _, _, pattern in runs for spec in pattern}
        ropes = {local: rope_tables(positions_t, jnp.asarray(np.asarray(rope_inv_freq(c, local), np.float32)))
                 for local in kinds}
        # Each layer ends with the norm of its output under the next layer's input norm (the
        # final norm after the last), fused with the residual add: `next_norm[i]`.
        weights["next_norm"] = _next_norms(weights["attn_norm"], param_value(self.final_norm))
        h = self.norm(x, select_layer(weights["attn_norm"], 0))

        # Which of the step's tokens are real, for MLPs whose cost depends on the tokens' values
        # (routed experts: a padding token would pull in experts of its own).
        valid_t = real_tokens(metadata, x.shape[0]) if self.routes_tokens else None

        def layer_fn(carry, i, spec):
            x, h, kv = carry
            return _decoder_layer(self, weights, i, spec, x, h, ropes[spec.sliding_window is not None], kv,
                                  metadata, attention, linear, valid_t)

        def period_fn(carry, first, pattern):
            for j, spec in enumerate(pattern):
                carry = layer_fn(carry, first + j, spec)
            return carry, None

        carry = (x, h, attention.open_step(kv_cache, x.shape[0]))
        # (attn_norm: always an array or a tuple of them; a projection may be a quantized weight)
        stacked = not isinstance(weights["attn_norm"], (tuple, list))
        for start, stop, pattern in runs:
            if stacked and stop - start > len(pattern) and unroll is not True:
                carry, _ = lax.scan(lambda cr, i, pattern=pattern: period_fn(cr, i, pattern), carry,
                                    jnp.arange(start, stop, len(pattern), dtype=jnp.int32), unroll=unroll)
            else:
                for first in range(start, stop, len(pattern)):
                    carry, _ = period_fn(carry, first, pattern)
        _, h, kv_cache = carry
        kv_cache = attention.close_step(kv_cache, metadata)
        return h, kv_cache

    def embed_tokens(self, token_ids_t):
        """Embeddings [T, D] of token ids [T] (Gemma scales them)."""
        return param_value(self.embed)[token_ids_t]

    def norm(self, x, weight):
        """RMSNorm of x, scaled by `weight` (Gemma scales by 1 + weight)."""
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def _make_layers(self, config: ModelConfig, init: _Init) -> nnx.Module:
        return DecoderLayers(config, init)

    # The MLP routes each token by its value (mixture of experts): __call__ passes `mlp` which
    # tokens are real.
    routes_tokens = False

    def mlp(self, w, i, h_td, linear: Linear, valid_t=None):
        """The MLP of layer i on normed hidden states h_td [T, D] (SwiGLU, or Gemma's GeGLU by
        `mlp_activation`; overridden by the mixture-of-experts models). Returns [T, D], or the
        down projection's float32 split-K partials [S, T, D] (`Linear.partials`), which the
        residual add sums. valid_t: bool [T], the real tokens (where `routes_tokens`)."""
        c = self.config
        act = project(w, i, h_td, "w_gate_up", c.hidden_size, linear, activation=self.mlp_activation)
        return project(w, i, act, "w_down", c.intermediate_size, linear, partials=True)

    def compute_logits(self, hidden_td, linear: Linear = XLA_LINEAR):
        """Float32 logits [T, V] from final hidden states [T, D]."""
        head = param_value(self.lm_head if self.lm_head is not None else self.embed)
        return linear(hidden_td, head, transpose=True, out_dtype=jnp.float32)


def layer_runs(config: ModelConfig) -> list[tuple[int, int, tuple[LayerSpec, ...]]]:
    """Runs [start, stop) of layers, each a repeated pattern of static attention settings
    (stop - start a multiple of its length); each run is one scan whose body is one pattern.

    A model with one setting throughout is one run of a one-layer pattern. Layers that cycle
    through settings (Gemma 2: sliding, global; Gemma 3: five sliding, one global) are one run
    of that cycle, plus the last partial cycle; other models get maximal runs of equal settings.
    """
    specs = [LayerSpec(scale=config.attention_scale, sliding_window=w, logit_softcap=config.attn_logit_softcap)
             for w in config.sliding_windows]
    n = len(specs)
    for period in range(2, n // 2 + 1):
        if len(set(specs[:period])) > 1 and all(specs[i] == specs[i % period] for i in range(n)):
            whole = n - n % period
            return [(0, whole, tuple(specs[:period]))] + _equal_runs(specs[whole:], whole)
    return _equal_runs(specs, 0)


def _equal_runs(specs: list[LayerSpec], offset: int) -> list[tuple[int, int, tuple[LayerSpec, ...]]]:
    """Maximal runs of equal settings, each a one-layer pattern."""
    runs, start = [], offset
    for spec, group in itertools.groupby(specs):
        n = len(list(group))
        runs.append((start, start + n, (spec,)))
        start += n
    return runs


def project(w, i, x, name: str, rows: int, linear: Linear, *, partials: bool = False, activation: str | None = None):
    """x @ layer i's weight `name` of the layer weights `w`, viewed as a matrix of `rows` rows;
    with `activation`, the gated act(x @ gate) * (x @ up) of its column halves (`Linear.gated`);
    with `partials`, possibly the unsummed split-K partials (`Linear.partials`)."""
    weight = w[name]
    if isinstance(weight, (tuple, list)):
        weight, layer = weight[i].reshape(rows, -1), None
    else:
        weight, layer = weight.reshape(weight.shape[0], rows, -1), i
    if activation is not None:
        return linear.gated(x, weight, layer, activation=activation)
    if partials:
        return linear.partials(x, weight, layer)
    return linear(x, weight, layer)


def _next_norms(attn_norm, final_norm):
    """The norm weights each layer's output is normed with: layer i + 1's input norm, and the
    final norm after the last layer (stacked [L, D], or a tuple for per-layer weights)."""
    if isinstance(attn_norm, (tuple, list)):
        return tuple(attn_norm[1:]) + (final_norm,)
    return jnp.concatenate([attn_norm[1:], final_norm[None].astype(attn_norm.dtype)])


def real_tokens(metadata, num_tokens: int):
    """bool [T]: the step's real tokens (False for the padding of a token bucket). The paged
    backends pack sequences' tokens first (cu_q_lens' last entry counts them); the contiguous
    cache marks padding with a negative position."""
    if hasattr(metadata, "cu_q_lens_s1"):
        return jnp.arange(num_tokens) < metadata.cu_q_lens_s1[-1]
    if hasattr(metadata, "positions_bs"):
        return metadata.positions_bs.reshape(-1) >= 0
    return jnp.ones((num_tokens,), bool)


def _decoder_layer(model, w, i, spec: LayerSpec, x_td, h_td, rope_cs, kv_cache, metadata,
                   attention: AttentionBackend, linear: Linear, valid_t=None):
    """One pre-norm decoder layer, layer i of the stacked weights (or of the per-layer ones).

    Takes the residual stream x_td and its norm h_td under this layer's input norm; returns
    (x, its norm under the next layer's input norm, kv_cache). Attention then `model.mlp`, each
    output added to the residual by `Linear.add_norm` together with the norm that follows (and
    normed first where the layers have post norms, as Gemma's do)."""
    c = model.config
    t = x_td.shape[0]
    K, H, D = c.num_kv_heads, c.head_dim, c.hidden_size
    eps, kind = c.rms_norm_eps, model.norm_kind

    def finished(y):  # a projection's output as one [T, D] array (partials summed)
        return finish_partials(y, x_td.dtype)

    head_norms = {}
    if w["q_norm"] is not None:  # per-head q/k norms go into the fused kernel too, in the model's order
        head_norms = dict(q_norm=w["q_norm"][i] if isinstance(w["q_norm"], (tuple, list)) else w["q_norm"],
                          k_norm=w["k_norm"][i] if isinstance(w["k_norm"], (tuple, list)) else w["k_norm"],
                          norm_eps=eps, norm_kind=kind)
    norms_in_dtype = not head_norms or head_norms["q_norm"].dtype == head_norms["k_norm"].dtype == x_td.dtype
    fused = (w["b_qkv"] is None and hasattr(attention, "attend_qkv") and norms_in_dtype
             and attention.fuses_qkv(kv_cache, H, x_td.dtype, t))
    if fused:  # the split-K sum, head norms, RoPE and the k/v writes in one kernel (see `attend_qkv`)
        qkv = project(w, i, h_td, "w_qkv", D, linear, partials=True)
        o_tnh, kv_cache = attention.attend_qkv(qkv, rope_cs[0][:, 0], rope_cs[1][:, 0], kv_cache, metadata, spec, i,
                                               num_kv_heads=K, dtype=x_td.dtype, **head_norms)
    else:
        o_tnh, kv_cache = _attend_unfused(model, w, i, spec, h_td, rope_cs, kv_cache, metadata, attention, linear)
    attn_out = project(w, i, o_tnh.reshape(t, -1), "w_o", c.num_heads * H, linear, partials=True)
    if w["b_o"] is not None:
        attn_out = finished(attn_out) + select_layer(w["b_o"], i)
    if w.get("post_attn_norm") is not None:
        attn_out = model.norm(finished(attn_out), select_layer(w["post_attn_norm"], i))
    x_td, h_td = linear.add_norm(attn_out, x_td, w["mlp_norm"], i, eps=eps, kind=kind)

    mlp_out = model.mlp(w, i, h_td, linear, valid_t)
    if w.get("post_mlp_norm") is not None:
        mlp_out = model.norm(finished(mlp_out), select_layer(w["post_mlp_norm"], i))
    x_td, h_td = linear.add_norm(mlp_out, x_td, w["next_norm"], i, eps=eps, kind=kind)
    return x_td, h_td, kv_cache


def _attend_unfused(model, w, i, spec: LayerSpec, h_td, rope_cs, kv_cache, metadata, attention: AttentionBackend,
                    linear: Linear):
    """Attention of layer i from the normed hidden states: the q|k|v projection, its bias and
    q/k norms where the family has them, RoPE, then the backend (which writes k and v)."""
    c = model.config
    t = h_td.shape[0]
    K, G, H, D = c.num_kv_heads, c.q_per_kv, c.head_dim, c.hidden_size
    qkv = project(w, i, h_td, "w_qkv", D, linear).reshape(t, K, G + 2, H)
    if w["b_qkv"] is not None:
        qkv = qkv + select_layer(w["b_qkv"], i)
    q = qkv[:, :, :G].reshape(t, K * G, H)
    k, v = qkv[:, :, G], qkv[:, :, G + 1]
    if w["q_norm"] is not None:
        q = model.norm(q, select_layer(w["q_norm"], i))
        k = model.norm(k, select_layer(w["k_norm"], i))
    q = rope(q, *rope_cs)
    k = rope(k, *rope_cs)
    return attention(q, k, v, kv_cache, metadata, spec, i)


def rms_norm(x, weight, eps: float):
    # Normalize in float32, cast back, then scale: the order HF uses, which matters in bf16.
    return rms_norm_ordered(x, weight, eps, "llama")


def rope_tables(positions_t, inv_freq):
    """cos and sin [T, 1, H/2] of the rotary angles of positions [T] (shared by every layer)."""
    angles = positions_t.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    return jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]


def rope(x_thh, cos, sin):
    """Rotary embedding in the HF (rotate-half) layout: x [T, heads, H] with `rope_tables` (the
    definition the fused kernel's reference shares)."""
    return rotate_half_rope(x_thh, cos, sin)
