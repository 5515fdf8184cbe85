"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): the Llama-family decoder of
models/llama.py with each layer's MLP replaced by a routed one.

The families differ only in config fields (models/llama.py's rule: fields, not subclasses):
Mixtral renormalizes the top-k routing probabilities (a softmax over the chosen experts'
logits); Qwen2-MoE and Qwen3-MoE take top-k of the full softmax and renormalize when
`norm_topk_prob`; Qwen2-MoE adds an always-on shared expert scaled by a sigmoid gate and has
q/k/v biases; Qwen3-MoE has qk-norm. Attention, norms and the layer scan are llama.py's.

Only routed experts are computed: the T*k (token, expert) pairs are sorted by expert and each
expert's rows are multiplied by that expert's weights in one grouped matmul
(`lax.ragged_dot`), so the work is that of k dense MLPs per token whatever the expert count.

Expert parallelism (`expert_mesh` set, see `expert_parallel`): each device of the mesh's "tp"
axis holds X / tp whole experts; tokens and routing stay replicated, every device computes
the pairs routed to its own experts, and one psum adds the devices' partial outputs (the
all-reduce a tensor-parallel MLP ends with anyway).

Glossary (beyond llama.py's): X experts, k experts per token, F each expert's mlp width,
S the shared expert's mlp width, P = T * k routed (token, expert) pairs.

Parameters (beside llama.py's attention and norm parameters; no dense w_gate_up / w_down):
  layers.w_router          [L, D, X]         router logits
  layers.w_expert_gate_up  [L, X, D, 2, F]   (layers, expert, embed, -, mlp)
  layers.w_expert_down     [L, X, F, D]      (layers, expert, mlp, embed)
  layers.w_shared_gate_up  [L, D, 2, S], layers.w_shared_down [L, S, D]  (shared expert)
  layers.w_shared_gate     [L, D, 1]         the shared expert's sigmoid gate
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxinfer.config import ModelConfig
from jaxinfer.models.linear import XLA_LINEAR, Linear
from jaxinfer.models.llama import (EMBED, LAYER_PARAMS, LAYERS, MLP, DecoderLayers, LlamaForCausalLM, _Init,
                                   project)

EXPERT = "expert"  # logical axis of the expert dimension (sharding/rules.py)

MOE_LAYER_PARAMS = ("w_router", "w_expert_gate_up", "w_expert_down", "w_shared_gate_up", "w_shared_down",
                    "w_shared_gate")


class MoeDecoderLayers(DecoderLayers):
    """llama.py's stacked attention and norm weights plus routed and shared expert weights."""

    def __init__(self, config: ModelConfig, init: _Init):
        super().__init__(config, init, dense_mlp=False)
        c = config
        L, D, X, F, S = c.num_layers, c.hidden_size, c.num_experts, c.moe_intermediate_size, \
            c.shared_expert_intermediate_size
        # The router stays whole on every device: each device needs every token's full routing.
        self.w_router = init.normal((L, D, X), (LAYERS, EMBED, None))
        self.w_expert_gate_up = init.normal((L, X, D, 2, F), (LAYERS, EXPERT, EMBED, None, MLP))
        self.w_expert_down = init.normal((L, X, F, D), (LAYERS, EXPERT, MLP, EMBED))
        self.w_shared_gate_up = init.normal((L, D, 2, S), (LAYERS, EMBED, None, MLP)) if S else None
        self.w_shared_down = init.normal((L, S, D), (LAYERS, MLP, EMBED)) if S else None
        self.w_shared_gate = init.normal((L, D, 1), (LAYERS, EMBED, None)) if S else None


class MoeForCausalLM(LlamaForCausalLM):
    """A mixture-of-experts decoder and its LM head (Mixtral, Qwen2-MoE, Qwen3-MoE); arguments
    and step interface as LlamaForCausalLM."""

    layer_params = LAYER_PARAMS + MOE_LAYER_PARAMS
    routes_tokens = True

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if not config.is_moe:
            raise ValueError(f"model type {config.model_type!r} has no experts; use LlamaForCausalLM")
        super().__init__(config, dtype=dtype, rngs=rngs)
        # A static attribute (part of the graph definition): the mesh whose "tp" axis the
        # experts are split over, or None (see `expert_parallel`).
        self.expert_mesh = None

    def _make_layers(self, config: ModelConfig, init: _Init) -> nnx.Module:
        return MoeDecoderLayers(config, init)

    def mlp(self, w, i, h_td, linear: Linear, valid_t=None):
        c = self.config
        logits_tx = project(w, i, h_td, "w_router", c.hidden_size, linear)
        weights_tk, experts_tk = route(logits_tx, c.num_experts_per_tok, c.norm_topk_prob)
        if valid_t is not None:  # padding tokens go to no expert: their rows are not computed
            experts_tk = jnp.where(valid_t[:, None], experts_tk, c.num_experts)
        experts = routed_experts if self.expert_mesh is None else functools.partial(
            routed_experts_parallel, mesh=self.expert_mesh)
        out_td = experts(h_td, weights_tk, experts_tk, w["w_expert_gate_up"], w["w_expert_down"], i, linear)
        if w["w_shared_gate_up"] is not None:  # [.., D, 2, S]: columns gate | up, SwiGLU in the epilogue
            act = project(w, i, h_td, "w_shared_gate_up", c.hidden_size, linear, activation="silu")
            shared = project(w, i, act, "w_shared_down", c.shared_expert_intermediate_size, linear)
            gate_t1 = jax.nn.sigmoid(project(w, i, h_td, "w_shared_gate", c.hidden_size, linear))
            out_td = out_td + gate_t1 * shared
        return out_td


def expert_parallel(graphdef: nnx.GraphDef, state: nnx.State, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, state) of the model with its experts computed expert-parallel over
    the mesh's "tp" axis; the state must be placed with the "expert" axis on "tp"
    (sharding/rules.py: EXPERT_PARALLEL_RULES). No array is copied."""
    module = nnx.merge(graphdef, state)
    if not isinstance(module, MoeForCausalLM):
        raise ValueError(f"expert parallelism needs a mixture-of-experts model, not {type(module).__name__}")
    tp, experts = mesh.shape["tp"], module.config.num_experts
    if experts % tp:
        raise ValueError(f"expert parallelism splits num_experts={experts} over tensor_parallel_size={tp}, "
                         "which does not divide it")
    module.expert_mesh = mesh
    return nnx.split(module)


def route(logits_tx, k: int, normalize: bool):
    """Top-k routing: the k experts of largest softmax probability (the k largest logits), their
    probabilities renormalized to sum to one when `normalize` (a softmax over the chosen
    logits, Mixtral's rule), else their share of the softmax over all X experts; float32.

    Computed without materializing the X probabilities: at decode every extra kernel counts.
    logits_tx [T, X]. Returns (weights_tk float32 [T, k], experts_tk int32 [T, k]).
    """
    logits = logits_tx.astype(jnp.float32)
    top, experts = lax.top_k(logits, k)
    if normalize:
        weights = jax.nn.softmax(top, axis=-1)
    else:
        weights = jnp.exp(top - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    return weights, experts.astype(jnp.int32)


def routed_experts(x_td, weights_tk, experts_tk, w_gate_up, w_down, layer=None, linear: Linear = XLA_LINEAR):
    """Sum over each token's k experts of weight * SwiGLU expert(x), computing routed pairs only.

    Args:
      x_td: [T, D] normed hidden states.
      weights_tk: [T, k] routing weights; experts_tk: int32 [T, k] expert ids.
      w_gate_up: [X, D, 2, F] every expert's gate and up projections, or the layers' stack
        [L, X, D, 2, F] (or a tuple of per-layer arrays) with `layer` selecting one.
      w_down: [X, F, D] every expert's down projection (stacked likewise).
      layer: None, or the layer index into stacked weights (may be traced).
      linear: the projection hook; its `grouped` product runs the experts (on a GPU at decode
        sizes a kernel that reads only the routed experts' weights, in place in the stack).
    Pairs whose expert id is X (or more) are not computed and add nothing (expert parallelism
    marks other devices' pairs so).
    Returns:
      [T, D] in x's dtype.
    """
    if isinstance(w_gate_up, (tuple, list)):  # per-layer arrays: take the layer's (no copy)
        w_gate_up, w_down, layer = w_gate_up[layer], w_down[layer], None
    t, k = experts_tk.shape
    x_experts, d = w_down.shape[-3], w_down.shape[-1]
    # Sort the P = T*k pairs by expert so that each expert's rows are contiguous: the groups of
    # the grouped matmul, with group_sizes[e] rows for expert e (zero rows cost nothing).
    expert_p = experts_tk.reshape(-1)
    order_p = jnp.argsort(expert_p, stable=True)
    token_p = order_p // k
    # (ids >= X not counted; a compare-and-sum XLA fuses into one reduction, where bincount scatters)
    group_sizes = jnp.sum(expert_p[:, None] == jnp.arange(x_experts, dtype=expert_p.dtype)[None, :], axis=0,
                          dtype=jnp.int32)

    gate_up = w_gate_up.reshape(*w_gate_up.shape[:-2], -1)  # [.., X, D, 2F]: columns gate | up
    h_pf = linear.grouped(x_td[token_p], gate_up, group_sizes, layer, activation="silu")
    y_pd = linear.grouped(h_pf.astype(x_td.dtype), w_down, group_sizes, layer)
    if y_pd.ndim == 3:  # the kernel's split-K partials
        y_pd = jnp.sum(y_pd, axis=0)
    # Rows past the counted pairs (other devices' experts) are unspecified: weight them by 0.
    counted_p = jnp.arange(expert_p.shape[0]) < jnp.sum(group_sizes)
    y_pd = jnp.where(counted_p[:, None], y_pd * weights_tk.reshape(-1)[order_p][:, None], 0.0)
    return jnp.zeros((t, d), jnp.float32).at[token_p].add(y_pd).astype(x_td.dtype)


def routed_experts_parallel(x_td, weights_tk, experts_tk, w_gate_up, w_down, layer=None,
                            linear: Linear = XLA_LINEAR, *, mesh: Mesh):
    """`routed_experts` with the expert axis of both weights split over the mesh's "tp" axis:
    each device computes the pairs of its X / tp experts and a psum sums the partial outputs."""
    if isinstance(w_gate_up, (tuple, list)):  # per-layer arrays: take the layer's (no copy)
        w_gate_up, w_down, layer = w_gate_up[layer], w_down[layer], None
    stacked = layer is not None
    expert_spec = P(None, "tp") if stacked else P("tp")

    def local(x_td, weights_tk, experts_tk, w_gate_up, w_down, layer):
        n = w_down.shape[-3]  # this device's experts: ids first .. first + n - 1
        first = lax.axis_index("tp") * n
        mine = (experts_tk >= first) & (experts_tk < first + n)
        part = routed_experts(x_td, weights_tk, jnp.where(mine, experts_tk - first, n), w_gate_up, w_down,
                              layer if stacked else None, linear)
        return lax.psum(part, "tp")

    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), expert_spec, expert_spec, P()), out_specs=P())(
        x_td, weights_tk, experts_tk, w_gate_up, w_down, layer)
