"""Putting loaded parameters on the devices, one tensor at a time, each straight into its shards.

A split tensor never passes through one device whole: `jax.make_array_from_callback` asks for
each device's slice of the host array (in a multi-process run, only this process's devices'
slices), so a model too large for one device still loads onto a mesh. Each host tensor is
dropped once placed, so the host holds the checkpoint's converted tensors at most once.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, Sharding


def shardings_for(config, sharding) -> dict | None:
    """The shardings of a model's parameters as a nested dict in the state's structure.

    Args:
      config: the model's ModelConfig.
      sharding: None (the default device), a Mesh (split by the rules table of
        sharding/rules.py), or shardings in the state's structure (an nnx.State such as
        `param_shardings(...)` gives, or a nested dict).
    """
    from flax import nnx

    if sharding is None or isinstance(sharding, dict):
        return sharding
    if isinstance(sharding, Mesh):
        from jaxinfer.sharding import param_shardings

        sharding = param_shardings(config, sharding)
    if isinstance(sharding, nnx.State):
        return nnx.to_pure_dict(sharding)
    raise TypeError(f"sharding must be None, a Mesh, or shardings in the parameters' structure; got "
                    f"{type(sharding).__name__}")


def keyed(tree) -> dict[str, object]:
    """{path string: leaf} of a tree, to match leaves of trees that differ in structure."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def place_params(host_params, shardings: dict | None = None, desc: str = "loading weights"):
    """The host tree's arrays on the devices, tensor by tensor, with a progress bar over tensors.

    Args:
      host_params: a nested dict of host (numpy) arrays; emptied as its tensors are placed.
      shardings: from `shardings_for`; a tensor with no entry there (a quantized checkpoint's
        packed weights, which the rules table does not cover) goes to the default device.
      desc: the progress bar's label (shown on a terminal, by the first process only).
    """
    from tqdm.auto import tqdm

    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(host_params)
    _clear(host_params)
    targets = keyed(shardings) if shardings is not None else {}
    placed = []
    with tqdm(total=len(paths_leaves), desc=desc, unit="tensor", disable=None if jax.process_index() == 0 else True,
              leave=False) as bar:
        for i, (path, x) in enumerate(paths_leaves):
            paths_leaves[i] = None  # the host copy goes as soon as its shards are on the devices
            target = targets.get(jax.tree_util.keystr(path))
            if isinstance(target, Sharding):
                placed.append(jax.make_array_from_callback(x.shape, target, lambda index, x=x: x[index]))
            else:
                placed.append(jax.device_put(x))
            del x
            bar.update(1)
    return jax.tree_util.tree_unflatten(treedef, placed)


def _clear(tree) -> None:
    """Empties the dicts of a nested dict, so its leaves live only as long as the caller's list."""
    if isinstance(tree, dict):
        for value in tree.values():
            _clear(value)
        tree.clear()
