"""Model families as Flax NNX modules, and the functional view the engine runs.

A model is split once into a graph definition (static: the config and the module structure)
and a state (the parameters, a pytree of `nnx.Param`); a step is a pure function of the state:
`nnx.merge(graphdef, state)` inside the jitted function. Dense model types map onto the
Llama-family module, mixture-of-experts ones onto its routed-MLP variant (models/moe.py),
Gemma 2/3 onto its Gemma variant (models/gemma.py); Phi-3 is the Llama module as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import GEMMA_TYPES, ModelConfig
from jaxinfer.models.gemma import GemmaForCausalLM
from jaxinfer.models.llama import LlamaForCausalLM, param_value
from jaxinfer.models.moe import MoeForCausalLM

__all__ = ["GemmaForCausalLM", "LlamaForCausalLM", "MoeForCausalLM", "abstract_model", "create_model", "layer_views",
           "layers_are_stacked", "model_class", "param_dtype", "param_value", "random_model", "state_from_tree",
           "unstack_layers"]


def model_class(config: ModelConfig) -> type[nnx.Module]:
    """The module class implementing `config.model_type`."""
    if config.is_moe:
        return MoeForCausalLM
    if config.model_type in GEMMA_TYPES:
        return GemmaForCausalLM
    return LlamaForCausalLM


def create_model(config: ModelConfig, *, dtype=jnp.float32, seed: int = 0, **kwargs) -> nnx.Module:
    """A model with random weights (tests, benchmarks)."""
    return model_class(config)(config, dtype=dtype, rngs=nnx.Rngs(seed), **kwargs)


def random_model(config: ModelConfig, *, dtype=jnp.float32, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, state) of a model with `create_model`'s random weights, made by one
    compiled program on the default device: eager initialisation runs one small program per
    parameter and moves nothing faster (6.6 s of an 8B engine's 12 s warm start on the H200)."""
    graphdef, _ = abstract_model(config, dtype)
    state = jax.jit(lambda: nnx.split(create_model(config, dtype=dtype, seed=seed))[1])()
    return graphdef, state


def abstract_model(config: ModelConfig, dtype=jnp.float32, **kwargs) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, state of ShapeDtypeStructs with sharding metadata), allocating nothing."""
    cls = model_class(config)
    return nnx.split(nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0), **kwargs)))


def state_from_tree(config: ModelConfig, tree, dtype=None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, state) of a model whose parameters are `tree`, a nested dict of arrays
    in the state's structure (what the checkpoint loaders build)."""
    if dtype is None:
        dtype = jax.tree.leaves(tree)[0].dtype
    graphdef, state = abstract_model(config, dtype)
    nnx.replace_by_pure_dict(state, tree)
    return graphdef, state


def param_dtype(state) -> jnp.dtype:
    """The dtype the model computes in (its embedding's; projections may be quantized)."""
    return jnp.dtype(param_value(state["embed"]).dtype)


def unstack_layers(state: nnx.State) -> nnx.State:
    """The state with every stacked layer parameter [L, ...] split into a tuple of L arrays, so
    the model runs its layers unrolled, each on its own arrays (see LlamaForCausalLM). The
    stacked arrays are not kept: drop other references to them to free their memory."""
    def split(path, x):
        if path and getattr(path[0], "key", None) == "layers":
            return tuple(x[i] for i in range(x.shape[0]))
        return x

    return jax.tree_util.tree_map_with_path(split, state)


def layer_views(state: nnx.State) -> nnx.State:
    """Per-layer arrays that share the stacked arrays' memory (CPU only: a host buffer's
    slices can be aliased without a copy), in the form `unstack_layers` gives. The stacked
    state must be kept alive and never donated while the views are used."""
    import numpy as np

    def split(path, x):
        if path and getattr(path[0], "key", None) == "layers":
            host = np.asarray(x)  # the CPU buffer itself, no copy
            (device,) = x.devices()
            return tuple(jax.device_put(host[i], device, may_alias=True) for i in range(x.shape[0]))
        return x

    if jax.default_backend() != "cpu" or any(len(x.devices()) > 1 for x in jax.tree.leaves(state)):
        raise ValueError("zero-copy layer views exist for one CPU device only; use unstack_layers")
    return jax.tree_util.tree_map_with_path(split, state)


def layers_are_stacked(state: nnx.State) -> bool:
    """Whether the layer parameters are stacked arrays (not per-layer tuples)."""
    return not isinstance(param_value(state["layers"]["attn_norm"]), tuple)
