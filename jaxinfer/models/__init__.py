"""Model families as Flax NNX modules, and the functional view the engine runs.

A model is split once into a graph definition (static: the config and the module structure)
and a state (the parameters, a pytree of `nnx.Param`); a step is a pure function of the state:
`nnx.merge(graphdef, state)` inside the jitted function. Every supported model type currently
maps onto the Llama-family module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.models.llama import LlamaForCausalLM


def model_class(config: ModelConfig) -> type[nnx.Module]:
    """The module class implementing `config.model_type`."""
    return LlamaForCausalLM


def create_model(config: ModelConfig, *, dtype=jnp.float32, seed: int = 0, **kwargs) -> nnx.Module:
    """A model with random weights (tests, benchmarks)."""
    return model_class(config)(config, dtype=dtype, rngs=nnx.Rngs(seed), **kwargs)


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
    """The dtype of the model's weights (its first parameter's)."""
    return jnp.dtype(jax.tree.leaves(state)[0].dtype)
