"""Device meshes with named axes ("dp", "tp").

"tp" splits each layer's heads, mlp width and vocabulary over devices (sharding/rules.py);
"dp" holds independent replicas and splits no parameter: replica i is the engine over
`mesh.devices[i]` (jaxinfer/engine/data_parallel.py). The tp axis is the last (fastest
varying) one so that a tp group is a run of neighbouring devices, which on a GPU host share
the fastest links.

Axes to come, in their fixed order: ("dp", "pp", "ep", "tp"). "pp" (pipeline stages: layers
split into consecutive groups) and "ep" (whole experts split over devices on an axis of their
own, instead of reusing "tp" as `EXPERT_PARALLEL_RULES` does today) will sit between "dp" and
"tp". The order runs from the axis that communicates least to the one that communicates most
(replicas never; pipeline stages once per stage boundary; expert groups an all-to-all per MoE
layer; tensor-parallel groups an all-reduce after every attention and MLP block), so the
chattiest axis gets the neighbouring devices. Code names axes, never positions, so adding an
axis of size 1 changes nothing.

Multi-host: `jax.distributed.initialize()` runs in every process before a mesh is built
(jaxinfer/distributed.py; the CLI's --coordinator-address, --num-processes, --process-id);
`jax.devices()` then lists the devices of all hosts, `make_mesh` spans them, and each process
feeds the same step to its own devices (docs/sharding.md).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("dp", "tp")


def make_mesh(tp: int = 1, dp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (dp, tp) mesh.

    Args:
      tp: tensor-parallel size (devices per model replica).
      dp: data-parallel size (replicas).
      devices: exactly dp * tp devices (default: the first dp * tp of `jax.devices()`).
    """
    for name, value in (("tp", tp), ("dp", dp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    need = tp * dp
    if devices is None:
        available = jax.devices()
        if need > len(available):
            raise ValueError(f"a mesh of dp={dp} x tp={tp} needs {need} devices, but only {len(available)} "
                             f"{available[0].platform} device(s) are visible (on the CPU, simulate more with "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={need} before JAX starts)")
        devices = available[:need]
    devices = list(devices)
    if len(devices) != need:
        raise ValueError(f"a mesh of dp={dp} x tp={tp} needs exactly {need} devices, got {len(devices)}")
    if len(set(devices)) != len(devices):
        raise ValueError("the devices of a mesh must be distinct")
    return Mesh(np.array(devices, dtype=object).reshape(dp, tp), AXES)
