"""Multi-process runs: every process joins one JAX distributed system before touching a device.

Each process then runs the same engine on the same requests (SPMD, docs/sharding.md): the
scheduler is deterministic host Python, so every process plans the same steps and feeds its
own devices its part of each, and XLA's collectives join the parts. One process per host on
GPU hosts (with all its GPUs), one per TPU VM worker; on the CPU, gloo carries the
collectives (JAX's default for CPU processes that run distributed).
"""

from __future__ import annotations

import argparse
import os

# Read by jax.distributed.initialize itself when no address is given.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


def add_args(p: argparse.ArgumentParser) -> None:
    """The multi-process flags (vLLM has no offline equivalents; these are JAX's names)."""
    p.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0's coordinator; starts a multi-process run (also: $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="processes in the run (detected on TPU VMs, SLURM and Open MPI when left out)")
    p.add_argument("--process-id", type=int, default=None,
                   help="this process's index, 0 .. num-processes - 1 (detected where --num-processes is)")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts jax.distributed when any setting is given here or in $JAX_COORDINATOR_ADDRESS;
    returns whether it did. Must run before anything asks JAX for its devices.

    Args:
      coordinator_address: host:port where process 0 listens (every process gives the same).
      num_processes: how many processes join.
      process_id: this process's index.
    Unset values are left to JAX, which reads them from a TPU VM's metadata or from SLURM's
    and Open MPI's environment.
    """
    if coordinator_address is None and num_processes is None and process_id is None \
            and not os.environ.get(COORDINATOR_ENV):
        return False
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be a positive integer, got {num_processes}")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise ValueError(f"--process-id must be in 0 .. {'num-processes' if num_processes is None else num_processes} - 1, "
                         f"got {process_id}")
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(f"--coordinator-address must be host:port, got {coordinator_address!r}")
    import jax

    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
