"""One host-to-device transfer for a pytree of small host arrays.

A step's inputs are a dozen small NumPy arrays; passed to a jitted function one by one, each
is its own transfer. `pack` lays every leaf (4-byte dtypes only) end to end in one int32
array, and `unpack`, inside the jitted function, cuts it back into the same pytree. The
`PackSpec` (structure, shapes, dtypes) is a static argument: it depends only on the bucket.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# The packable dtypes and their names: `np.dtype.name` is computed in Python on each access,
# which made packing the sampler's 14 arrays take 310 us on a 2-core CPU (50 us without), every
# step.
_PACKABLE = {np.dtype(t): np.dtype(t).name for t in (np.int32, np.uint32, np.float32)}


@dataclasses.dataclass(frozen=True)
class PackSpec:
    treedef: object
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]


def pack(tree) -> tuple[np.ndarray, PackSpec]:
    """Every leaf of `tree` (int32, uint32 or float32 arrays or scalars) in one int32 array."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [np.asarray(leaf) for leaf in leaves]
    names = []
    for a in arrays:
        name = _PACKABLE.get(a.dtype)
        if name is None:
            raise TypeError(f"cannot pack a {a.dtype} leaf; only {list(_PACKABLE.values())}")
        names.append(name)
    flat = np.concatenate([a.reshape(-1).view(np.int32) for a in arrays]) if arrays else np.zeros(0, np.int32)
    return flat, PackSpec(treedef, tuple(a.shape for a in arrays), tuple(names))


def unpack(packed, spec: PackSpec):
    """The pytree `pack` made, from its packed array (a jax array inside jit, or NumPy)."""
    leaves, cursor = [], 0
    for shape, dtype in zip(spec.shapes, spec.dtypes):
        size = int(np.prod(shape, dtype=np.int64))
        part = packed[cursor:cursor + size]
        if dtype != "int32":
            part = jax.lax.bitcast_convert_type(part, jnp.dtype(dtype))
        leaves.append(part.reshape(shape))
        cursor += size
    return jax.tree.unflatten(spec.treedef, leaves)
