"""The one table from logical axes to mesh axes, and the shardings it gives.

Layers name logical roles only (Flax sharding metadata on each `nnx.Param` of
`jaxinfer/models/llama.py`); this table decides
which mesh axis each role is split over. Megatron-style tensor parallelism: attention heads,
kv heads, the mlp width and the vocabulary are split over "tp"; the model width and the head
dim are replicated, so each attention head and each mlp column lives whole on one device and
XLA inserts one all-reduce after `wo_nhd` and one after `w_down_fd`. "dp" (replicas) splits no
parameter.

GQA with tp > kv heads: a dimension that the mesh axis does not divide is left replicated, so
with 4 kv heads on tp=8 the kv projections and the KV pools are copied on every device (each
device holds all kv heads, and its query heads read the ones they need). Uneven splits are
never attempted: they would need padding the heads, which changes the model.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.config import ModelConfig

# logical axis -> mesh axis name, or None for replicated.
DEFAULT_RULES: Mapping[str, str | None] = {
    "layers": None,
    "vocab": "tp",
    "heads": "tp",
    "kv_heads": "tp",
    "mlp": "tp",
    "embed": None,
    "head_dim": None,
    # Experts stay whole on every device; their mlp width is split over "tp" like a dense MLP's.
    "expert": None,
}

# Expert parallelism (EngineConfig.enable_expert_parallel): whole experts split over "tp", each
# expert's mlp width then unsplit (a mesh axis splits one dimension of an array); see models/moe.py.
EXPERT_PARALLEL_RULES: Mapping[str, str | None] = {**DEFAULT_RULES, "expert": "tp"}


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, str | None], mesh: Mesh,
                    shape: Sequence[int]) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have these logical axes.

    Args:
      axes: one logical axis name per dimension (None: replicated).
      rules: logical axis -> mesh axis name or None.
      mesh: the mesh the spec is for (gives each mesh axis its size).
      shape: the array's shape.
    A dimension stays replicated when its mesh axis does not divide it (GQA with tp > kv
    heads), or when an earlier dimension already uses that mesh axis (a mesh axis may split
    only one dimension of an array).
    """
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for an array of shape {tuple(shape)}")
    entries: list[str | None] = []
    used: set[str] = set()
    for name, dim in zip(axes, shape):
        if name is None:
            entries.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; rules cover {sorted(rules)}")
        mesh_axis = rules[name]
        if mesh_axis is None:
            entries.append(None)
            continue
        if mesh_axis not in mesh.shape:
            raise ValueError(f"rule {name!r} -> {mesh_axis!r}, but the mesh has axes {tuple(mesh.axis_names)}")
        if dim % mesh.shape[mesh_axis] or mesh_axis in used:
            entries.append(None)
        else:
            entries.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*entries)


def logical_axes(state):
    """The logical axis names of every parameter of a model state (Flax sharding metadata), as
    PartitionSpecs of names in the state's structure."""
    from flax import nnx

    return nnx.get_partition_spec(state)


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES):
    """A NamedSharding for every parameter, in the model state's structure.

    Args:
      config: the model configuration (gives the module, its logical axes and shapes).
      mesh: the device mesh.
      rules: logical axis -> mesh axis (default: DEFAULT_RULES).
    """
    from jaxinfer.models import abstract_model

    _, state = abstract_model(config)
    return jax.tree.map(lambda names, shaped: NamedSharding(mesh, logical_to_spec(tuple(names), rules, mesh,
                                                                                   shaped.shape)),
                        logical_axes(state), state, is_leaf=lambda x: isinstance(x, PartitionSpec))


def kv_cache_sharding(config: ModelConfig, mesh: Mesh,
                      rules: Mapping[str, str | None] = DEFAULT_RULES) -> NamedSharding:
    """The sharding of the stacked KV page pools [K, L, P, page_size, H]: kv heads (axis 0) by
    the rules, layers, pages, offsets and head dim replicated. Pages must stay whole on each
    device because the block manager hands out page ids that every shard indexes alike."""
    head = logical_to_spec(("kv_heads",), rules, mesh, (config.num_kv_heads,))
    return NamedSharding(mesh, PartitionSpec(*head, None, None, None, None))


def is_placed(tree, shardings) -> bool:
    """Whether every array of `tree` already has the matching sharding of `shardings`."""
    leaves = jax.tree.leaves(tree)
    targets = jax.tree.leaves(shardings)
    if len(leaves) != len(targets):
        raise ValueError(f"{len(leaves)} arrays for {len(targets)} shardings: the trees do not match")
    return all(isinstance(a, jax.Array) and a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(leaves, targets))
