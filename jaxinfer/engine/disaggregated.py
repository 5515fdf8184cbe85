"""Prefill-decode disaggregation in one process: prompts are computed by a prefill engine on one
device group, and their KV pages move to a decode engine on another, which generates.

Why: a long prompt's prefill step stalls every decode sharing it (chunked prefill bounds the
stall but not the interference), and the two phases want different batch shapes. With the
phases on separate devices, decodes never wait behind a prompt.

How the pages move. The decode engine finds a prompt's pages the way it finds any cached prefix:
by the chained hash of each full page, which both engines compute alike (same model, KV layout
and cache salt; block_manager.namespace_root). A request goes first to the prefill engine, as a
one-token greedy request. When that finishes, its full prompt pages are still in the prefill
engine's prefix cache; they are gathered there (one program over every layer, as the host tier
gathers evictions), copied to the host, and written into the decode engine's host KV tier under
their hashes. Then the request, with its own sampling parameters, goes to the decode engine:
its prompt is a prefix-cache hit in the host tier, reloaded before its first step, so the decode
engine computes only the prompt's last partial page and samples every output token itself. The
outputs are therefore the ones the decode engine alone would give (the same pages, the same
sampler and seeds), which the tests check token for token.

The copy goes through host memory, as vLLM's offloading connector does; a device-to-device
transfer (NVLink, NIXL) would replace `_export`/`_import` and nothing else. The front end has
LLMEngine's request surface, like DataParallelEngine, so `LLM`, `jaxinfer batch` and the server
drive it unchanged.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import jax
import numpy as np

from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine, PromptType
from jaxinfer.engine.kv_offload import TRANSFER_BATCHES, exact_spans, gather_pages, rows_shardings
from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

# The decode engine's host tier when the config sets none: room for this many prompts of
# max_model_len tokens in flight between the engines.
DEFAULT_TRANSFER_PROMPTS = 8


def disaggregated_devices(config: EngineConfig, devices: Sequence[jax.Device] | None = None
                          ) -> tuple[list[jax.Device], list[jax.Device]]:
    """The prefill and the decode engine's devices: the first two groups of
    tensor_parallel_size devices (of `devices`, default `jax.devices()`)."""
    if config.data_parallel_size != 1:
        raise ValueError("prefill-decode disaggregation runs one prefill and one decode engine; "
                         "data_parallel_size must be 1")
    tp = config.tensor_parallel_size
    devices = list(devices or jax.devices())
    if len(devices) < 2 * tp:
        raise ValueError(f"prefill-decode disaggregation with tensor_parallel_size={tp} needs {2 * tp} devices "
                         f"(a prefill and a decode engine), but only {len(devices)} are visible")
    return devices[:tp], devices[tp:2 * tp]


@dataclasses.dataclass
class _InFlight:
    prompt: PromptType
    params: SamplingParams
    ids: list[int]
    cache_salt: str | None
    kwargs: dict


class DisaggregatedEngine:
    """A prefill engine and a decode engine on disjoint devices, with LLMEngine's request surface.

    Args:
      model: a loaded model; the prefill engine takes it over, the decode engine gets its own
        copy of the parameters on its devices.
      config: engine settings for both (prefix caching must be on). The decode engine's host
        KV tier receives the pages: config.kv_offloading_size GiB, or room for
        DEFAULT_TRANSFER_PROMPTS prompts of max_model_len tokens when unset.
      prefill_devices, decode_devices: disjoint groups of tensor_parallel_size devices each
        (default: the first and second such group of `jax.devices()`).
    """

    def __init__(self, model, config: EngineConfig, *, prefill_devices: Sequence[jax.Device] | None = None,
                 decode_devices: Sequence[jax.Device] | None = None):
        if not config.enable_prefix_caching:
            raise ValueError("prefill-decode disaggregation finds the moved pages through the prefix cache: "
                             "enable_prefix_caching must be on")
        tp = config.tensor_parallel_size
        if prefill_devices is None or decode_devices is None:
            prefill_devices, decode_devices = disaggregated_devices(config)
        prefill_devices, decode_devices = list(prefill_devices), list(decode_devices)
        if config.data_parallel_size != 1:
            raise ValueError("prefill-decode disaggregation runs one prefill and one decode engine; "
                             "data_parallel_size must be 1")
        for name, group in (("prefill", prefill_devices), ("decode", decode_devices)):
            if len(group) != tp:
                raise ValueError(f"the {name} engine needs tensor_parallel_size={tp} devices, got {len(group)}")
        if set(prefill_devices) & set(decode_devices):
            raise ValueError("the prefill and decode engines must run on different devices")
        params, graphdef = model.params, model.graphdef
        config = dataclasses.replace(config, disaggregate_prefill=False)  # what each engine is
        with jax.default_device(prefill_devices[0]):
            # It only computes prompts: no host tier, response cache or proposer of its own.
            self.prefill = LLMEngine(model, dataclasses.replace(config, kv_offloading_size=None,
                                                                 response_cache_size=0, speculative_config=None),
                                     devices=prefill_devices)
        decode_config = config
        if config.kv_offloading_size is None:
            spec = self.prefill.runner.kv_spec
            page_bytes = spec.total_bytes // spec.num_pages
            pages = DEFAULT_TRANSFER_PROMPTS * -(-self.prefill.max_model_len // config.page_size)
            decode_config = dataclasses.replace(config, kv_offloading_size=pages * page_bytes / 2**30)
        with jax.default_device(decode_devices[0]):
            self.decode = LLMEngine(dataclasses.replace(model, params=params, graphdef=graphdef), decode_config,
                                    devices=decode_devices)
        self.config = config
        self.model, self.tokenizer, self.model_config = self.decode.model, self.decode.tokenizer, self.decode.model_config
        self.max_model_len = min(self.prefill.max_model_len, self.decode.max_model_len)
        self.eos_token_ids = self.decode.eos_token_ids
        # The export's gather lands in the prefill device's pinned host memory (one DMA, read by
        # numpy without a copy; through pageable memory it ran at 1 GB/s on the H200).
        _, host_rows = rows_shardings(self.prefill.runner.kv_cache[0].sharding)
        self._gather = jax.jit(gather_pages, out_shardings=host_rows)
        if config.warmup:
            self.warm_export()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="jaxinfer-prefill")
        self._prefilling: dict[str, _InFlight] = {}
        self.num_transferred_pages = 0

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None, *,
                    cache_salt: str | None = None, **kwargs) -> None:
        """Queues a request (keyword arguments as LLMEngine.add_request's): checked as the decode
        engine would check it, then prefilled. Raises ValueError, changing nothing, when the
        request cannot be served."""
        params = params or SamplingParams()
        if request_id in self._prefilling or self.decode.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        _, ids, cache_salt = self.decode.check_request(prompt, params, cache_salt)
        first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                               output_kind=RequestOutputKind.FINAL_ONLY)
        self.prefill.add_request(request_id, {"prompt_token_ids": ids}, first, cache_salt=cache_salt,
                                 priority=kwargs.get("priority", 0))
        self._prefilling[request_id] = _InFlight(prompt, params, ids, cache_salt, kwargs)

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Aborts requests in either engine (unknown ids are ignored)."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        prefilling = [rid for rid in request_ids if self._prefilling.pop(rid, None) is not None]
        self.prefill.abort_request(prefilling)
        self.decode.abort_request([rid for rid in request_ids if rid not in prefilling])

    def has_unfinished_requests(self) -> bool:
        return bool(self._prefilling) or self.decode.has_unfinished_requests()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._prefilling) + self.decode.num_unfinished_requests

    # What /metrics reads: the decode engine's, where requests finish and tokens are counted.
    @property
    def metrics(self) -> EngineMetrics:
        return self.decode.metrics

    @property
    def scheduler(self):
        return self.decode.scheduler

    @property
    def block_manager(self):
        return self.decode.block_manager

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step of each engine that has work, the two in threads of their own (each blocks
        on its own device's tokens with the GIL released, so they overlap as data-parallel
        replicas do); then finished prefills hand their pages and their request to the decode
        engine. Returns the decode engine's outputs."""
        prefilling, decoding = self.prefill.has_unfinished_requests(), self.decode.has_unfinished_requests()
        if prefilling and decoding:
            prefilled = self._pool.submit(self.prefill.step)
            outputs = self.decode.step()
            prefilled = prefilled.result()
        else:
            prefilled = self.prefill.step() if prefilling else []
            outputs = self.decode.step() if decoding else []
        for out in prefilled:
            if out.finished and out.request_id in self._prefilling:
                self._hand_over(out.request_id, self._prefilling.pop(out.request_id))
        return outputs

    def _hand_over(self, request_id: str, req: _InFlight) -> None:
        hashes = self.decode.block_manager.hash_blocks(req.ids, req.cache_salt)
        # The decode engine never covers a prompt's last token from the cache, so its last
        # page (full or not) is computed there; only the pages before it move.
        hashes = hashes[:(len(req.ids) - 1) // self.config.page_size]
        self._import(*self._export(hashes))
        self.decode.add_request(request_id, req.prompt, req.params, cache_salt=req.cache_salt, **req.kwargs)

    def warm_export(self) -> None:
        """Compiles the export's gather for every transfer size (on the scratch page 0), so no
        prompt's hand-over compiles while serving."""
        for b in TRANSFER_BATCHES:
            jax.block_until_ready(self._gather(self.prefill.runner.kv_cache, np.zeros(b, np.int32)))

    def _export(self, hashes: list[bytes]) -> tuple[list[bytes], np.ndarray | None]:
        """The prompt pages the prefill engine still caches (the leading run of `hashes` found
        there), as host rows [B, 2, K, L, page_size, H]."""
        pages = self.prefill.block_manager.cached_device_pages(hashes)
        if not pages:
            return [], None
        # In the host tier's transfer sizes, so few shapes compile; every gather is queued before
        # the first is read (one wait, not one per transfer); numpy reads the pinned rows in place.
        parts = [self._gather(self.prefill.runner.kv_cache, np.asarray(pages[start:start + b], np.int32))
                 for start, b in exact_spans(len(pages))]
        return hashes[:len(pages)], np.concatenate([np.asarray(part) for part in parts])

    def _import(self, hashes: list[bytes], rows: np.ndarray | None) -> None:
        """Writes the rows into the decode engine's host tier under their hashes (pages it
        already holds are skipped), readable by its next step."""
        if not hashes:
            return
        slots, kept = [], []
        for digest, row in zip(hashes, rows):
            slot = self.decode.block_manager.import_host_page(digest)
            if slot is not None:
                slots.append(slot)
                kept.append(row)
        if slots:
            self.decode.runner.host_kv.write_rows(slots, np.stack(kept))
            self.num_transferred_pages += len(slots)
