"""Data parallelism: independent engine replicas behind one front end (docs/sharding.md).

Replica i is an LLMEngine over row i of a (dp, tp) mesh: its own tensor_parallel_size
devices, its own copy of the parameters, its own KV cache, scheduler and compiled steps. The
replicas never communicate, so a dense model's throughput grows with dp and nothing of one
replica's step waits for another's (vLLM does the same for dense models; only expert layers
would need the replicas to meet, which this engine does not do).

The front end has LLMEngine's request surface (add_request, step, abort_request,
has_unfinished_requests) and what is read off an engine from outside (tokenizer, model_config,
max_model_len, eos_token_ids, config; metrics, scheduler and block_manager as totals over the
replicas), so `LLM`, `jaxinfer batch` and the server (AsyncLLMEngine, the engine process,
/metrics) drive it as they drive one LLMEngine. A new request goes to the replica with the
fewest unfinished requests. `step()` steps every replica that has work, each in its own thread:
a replica's step blocks on its own tokens (at once without asynchronous scheduling, a step late
with it), and JAX releases the GIL while it waits, so while one replica waits for its device
another plans and launches its own step, and replicas on different devices compute at the same
time.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import jax
import numpy as np

from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine, PromptType
from jaxinfer.engine.metrics import EngineMetrics, merge_metrics
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams


def replica_devices(config: EngineConfig, devices: Sequence[jax.Device] | None = None) -> list[list[jax.Device]]:
    """The devices of each replica: the rows of a (data_parallel_size, tensor_parallel_size) mesh.

    Args:
      config: gives data_parallel_size and tensor_parallel_size.
      devices: exactly dp * tp devices (default: the first dp * tp of `jax.devices()`).
    In a multi-process run every process runs the same engine over one replica that spans all
    processes' devices (docs/sharding.md): dp must be 1 and tp the number of devices.
    """
    from jaxinfer.sharding import make_mesh

    dp, tp = config.data_parallel_size, config.tensor_parallel_size
    if jax.process_count() > 1:
        if dp > 1:
            raise ValueError(f"data_parallel_size={dp} with {jax.process_count()} processes: a multi-process run is "
                             "one replica over every process's devices; run one jaxinfer per replica instead")
        if tp != jax.device_count():
            raise ValueError(f"a multi-process run splits the model over all {jax.device_count()} devices of its "
                             f"{jax.process_count()} processes: tensor_parallel_size must be {jax.device_count()}, "
                             f"got {tp}")
    mesh = make_mesh(tp=tp, dp=dp, devices=devices)
    return [list(row) for row in mesh.devices]


def replica_seed(seed: int, index: int) -> int:
    """Replica 0 keeps the configured seed; the others get seeds derived from it, so requests
    without a seed do not sample alike on every replica."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence((seed, index)).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class SchedulerTotals:
    """The replicas' schedulers as one, for readers from outside (server/metrics.py): their
    running and waiting requests, summed."""

    num_running: int
    num_waiting: int


@dataclasses.dataclass(frozen=True)
class KVUsageTotals:
    """The replicas' block managers as one, for readers from outside: the mean fraction of KV
    pages in use (the pooled fraction when the replicas' caches are the same size)."""

    usage: float


class DataParallelEngine:
    """Engine replicas over disjoint device groups, with LLMEngine's request surface and the
    attributes read off one (the module docstring lists them).

    Args:
      model: a loaded model. Replica 0 takes it over as LLMEngine does (its parameters move
        to replica 0's devices, where loading with replica 0's sharding already put them);
        every other replica gets its own copy, placed on its devices from that tree.
      config: engine settings; data_parallel_size replicas of tensor_parallel_size devices.
      devices: dp * tp devices, replica i taking devices[i * tp:(i + 1) * tp] (default: the
        first dp * tp of `jax.devices()`).
    """

    def __init__(self, model, config: EngineConfig, *, devices: Sequence[jax.Device] | None = None):
        groups = replica_devices(config, devices)
        source_params, source_graphdef = model.params, model.graphdef
        self.config = config
        self.replicas: list[LLMEngine] = []
        for i, group in enumerate(groups):
            replica_model = model if i == 0 else dataclasses.replace(model, params=source_params,
                                                                     graphdef=source_graphdef)
            replica_config = dataclasses.replace(config, data_parallel_size=1, seed=replica_seed(config.seed, i))
            # Anything the engine creates without a placement (and the KV cache's memory
            # budget) goes to this replica's first device.
            with jax.default_device(group[0]):
                self.replicas.append(LLMEngine(replica_model, replica_config, devices=group))
        first = self.replicas[0]
        self.model, self.tokenizer, self.model_config = first.model, first.tokenizer, first.model_config
        self.max_model_len = min(r.max_model_len for r in self.replicas)
        self.eos_token_ids = first.eos_token_ids
        self._owner: dict[str, LLMEngine] = {}
        self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="jaxinfer-replica")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    **kwargs) -> None:
        """Queues a request on the replica with the fewest unfinished requests (the first of
        those on a tie); keyword arguments as LLMEngine.add_request's."""
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        replica = min(self.replicas, key=lambda r: r.num_unfinished_requests)
        replica.add_request(request_id, prompt, params, **kwargs)
        self._owner[request_id] = replica

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Aborts requests on whichever replica holds them (unknown ids are ignored)."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            replica = self._owner.pop(rid, None)
            if replica is not None:
                replica.abort_request(rid)

    def has_unfinished_requests(self) -> bool:
        return any(r.has_unfinished_requests() for r in self.replicas)

    @property
    def num_unfinished_requests(self) -> int:
        return sum(r.num_unfinished_requests for r in self.replicas)

    # What /metrics reads off an engine (server/metrics.py), as totals over the replicas: one
    # series per name, as one engine would report (vLLM labels each dp rank's series instead).
    # Each is a copy made when read; read them between steps (the server does, on the engine
    # thread).
    @property
    def metrics(self) -> EngineMetrics:
        """The replicas' metrics merged (`merge_metrics`: counters summed, histograms merged)."""
        return merge_metrics([r.metrics.snapshot() for r in self.replicas])

    @property
    def scheduler(self) -> SchedulerTotals:
        return SchedulerTotals(sum(r.scheduler.num_running for r in self.replicas),
                               sum(r.scheduler.num_waiting for r in self.replicas))

    @property
    def block_manager(self) -> KVUsageTotals:
        return KVUsageTotals(sum(float(r.block_manager.usage) for r in self.replicas) / len(self.replicas))

    def step(self) -> list[RequestOutput]:
        """One step of every replica that has work; their outputs, replica by replica."""
        busy = [r for r in self.replicas if r.has_unfinished_requests()]
        if len(busy) > 1:
            results = list(self._pool.map(LLMEngine.step, busy))
        else:
            results = [r.step() for r in busy]
        outputs = [o for result in results for o in result]
        for o in outputs:
            if o.finished:
                self._owner.pop(o.request_id, None)
        return outputs
