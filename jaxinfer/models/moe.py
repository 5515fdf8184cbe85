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
from jaxinfer.models.linear import Linear, select_layer
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

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if not config.is_moe:
            raise ValueError(f"model type {config.model_type!r} has no experts; use LlamaForCausalLM")
        super().__init__(config, dtype=dtype, rngs=rngs)
        # A static attribute (part of the graph definition): the mesh whose "tp" axis the
        # experts are split over, or None (see `expert_parallel`).
        self.expert_mesh = None

    def _make_layers(self, config: ModelConfig, init: _Init) -> nnx.Module:
        return MoeDecoderLayers(config, init)

    def mlp(self, w, i, h_td, linear: Linear):
        c = self.config
        logits_tx = project(w, i, h_td, "w_router", c.hidden_size, linear)
        weights_tk, experts_tk = route(logits_tx, c.num_experts_per_tok, c.norm_topk_prob)
        experts = routed_experts if self.expert_mesh is None else functools.partial(
            routed_experts_parallel, mesh=self.expert_mesh)
        out_td = experts(h_td, weights_tk, experts_tk, select_layer(w["w_expert_gate_up"], i),
                         select_layer(w["w_expert_down"], i))
        if w["w_shared_gate_up"] is not None:
            gate_up = project(w, i, h_td, "w_shared_gate_up", c.hidden_size, linear).reshape(h_td.shape[0], 2, -1)
            shared = project(w, i, jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1], "w_shared_down",
                             c.shared_expert_intermediate_size, linear)
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
    """Top-k routing: softmax over all X experts in float32, the k largest, renormalized to sum
    to one when `normalize` (which equals a softmax over the chosen logits, Mixtral's rule).

    logits_tx [T, X]. Returns (weights_tk float32 [T, k], experts_tk int32 [T, k]).
    """
    probs = jax.nn.softmax(logits_tx.astype(jnp.float32), axis=-1)
    weights, experts = lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def routed_experts(x_td, weights_tk, experts_tk, w_gate_up_xdf, w_down_xfd):
    """Sum over each token's k experts of weight * SwiGLU expert(x), computing routed pairs only.

    Args:
      x_td: [T, D] normed hidden states.
      weights_tk: [T, k] routing weights; experts_tk: int32 [T, k] expert ids.
      w_gate_up_xdf: [X, D, 2, F] every expert's gate and up projections.
      w_down_xfd: [X, F, D] every expert's down projection.
    Pairs whose expert id is X (or more) are not computed and add nothing (expert parallelism
    marks other devices' pairs so).
    Returns:
      [T, D] in x's dtype.
    """
    t, k = experts_tk.shape
    x_experts, d, _, f = w_gate_up_xdf.shape
    # Sort the P = T*k pairs by expert so that each expert's rows are contiguous: the groups of
    # the grouped matmul, with group_sizes[e] rows for expert e (zero rows cost nothing).
    expert_p = experts_tk.reshape(-1)
    order_p = jnp.argsort(expert_p, stable=True)
    token_p = order_p // k
    group_sizes = jnp.bincount(expert_p, length=x_experts).astype(jnp.int32)  # (ids >= X not counted)
    precision = lax.Precision.HIGHEST if x_td.dtype == jnp.float32 else None

    gate_up_pf = lax.ragged_dot(x_td[token_p], w_gate_up_xdf.reshape(x_experts, d, 2 * f), group_sizes,
                                precision=precision, preferred_element_type=jnp.float32)
    h_pf = (jax.nn.silu(gate_up_pf[:, :f]) * gate_up_pf[:, f:]).astype(x_td.dtype)
    y_pd = lax.ragged_dot(h_pf, w_down_xfd, group_sizes, precision=precision,
                          preferred_element_type=jnp.float32)
    y_pd = y_pd * weights_tk.reshape(-1)[order_p][:, None]
    # (rows past the last group, the uncounted pairs, come out of ragged_dot as zeros)
    return jnp.zeros((t, d), jnp.float32).at[token_p].add(y_pd).astype(x_td.dtype)


def routed_experts_parallel(x_td, weights_tk, experts_tk, w_gate_up_xdf, w_down_xfd, *, mesh: Mesh):
    """`routed_experts` with the expert axis of both weights split over the mesh's "tp" axis:
    each device computes the pairs of its X / tp experts and a psum sums the partial outputs."""
    def local(x_td, weights_tk, experts_tk, w_gate_up_xdf, w_down_xfd):
        n = w_gate_up_xdf.shape[0]  # this device's experts: ids first .. first + n - 1
        first = lax.axis_index("tp") * n
        mine = (experts_tk >= first) & (experts_tk < first + n)
        part = routed_experts(x_td, weights_tk, jnp.where(mine, experts_tk - first, n), w_gate_up_xdf, w_down_xfd)
        return lax.psum(part, "tp")

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), P("tp"), P("tp")), out_specs=P())(
        x_td, weights_tk, experts_tk, w_gate_up_xdf, w_down_xfd)
