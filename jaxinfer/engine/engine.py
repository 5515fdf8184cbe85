"""The synchronous engine: requests in, one scheduled and sampled step per `step()`, outputs out.

Each user request with `n` completions becomes n scheduler requests: the first computes the
prompt, the others are forked from its pages once it has (sharing the prompt's KV) and differ
by their seeds. Text is produced incrementally; a stop string ends a completion from here,
everything else (eos, stop ids, lengths) ends it inside the scheduler.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.config import CHECKPOINT_QUANTIZATION, FP8_KV_CACHE_DTYPES, DEFAULT_HOST_KV_BYTES, EngineConfig
from jaxinfer.engine.detokenizer import IncrementalDetokenizer
from jaxinfer.engine.kv_cache import KVCacheSpec, pages_for_memory_fraction
from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.engine.request import Request
from jaxinfer.engine.response_cache import ResponseCache
from jaxinfer.engine.runner import ModelRunner, RunnerConfig
from jaxinfer.engine.sampling import SamplingRow
from jaxinfer.engine.structured import Grammar, StructuredOutputs
from jaxinfer.models import layer_views, layers_are_stacked, param_dtype, unstack_layers
from jaxinfer.models.linear import Linear
from jaxinfer.engine.scheduler import Scheduler, SchedulerConfig
from jaxinfer.engine.speculative import SpeculationGovernor, TokenHistories, ngram_proposal
from jaxinfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | Sequence[int] | dict
# Speculative decoding's throttles (see LLMEngine.__init__).
MAX_PROPOSAL_BACKOFF = 16
MAX_VERIFYING_REQUESTS = 16
ASYNC_STEPS_WITHOUT_PROPOSALS = 4


@dataclasses.dataclass
class _Completion:
    """One of a request's n completions: a scheduler request plus its text state."""

    group: "_Group"
    index: int
    request: Request
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    delta_text: str = ""  # text not yet reported (DELTA outputs)
    delta_start: int = 0  # output tokens already reported (DELTA outputs)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    grammar: Grammar | None = None  # structured outputs: the matcher of this completion
    prompt_counted: bool = False  # its prompt is in the prompt-token metric


@dataclasses.dataclass
class _LaunchedStep:
    """A step queued on the device whose tokens the host has not read yet."""

    out: object  # SchedulerOutput
    pending: object  # runner.PendingStep
    num_prompt_tokens: int
    # Structured outputs: the sampler is not queued yet; it waits for the grammar bitmask.
    needs_mask: bool = False


@dataclasses.dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    completions: list[_Completion] = dataclasses.field(default_factory=list)
    # Position 0 has nothing before it to be scored from, as in vLLM.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    response_key: object = None  # its key in the response cache, when that may store it

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


def resolve_attention_backend(name: str, *, platform: str | None = None, mesh=None,
                              num_kv_heads: int | None = None):
    """The attention backend object for an EngineConfig.attention_backend value.

    "auto" takes the Pallas kernels on GPU and TPU and the portable XLA path on the CPU;
    "pallas" on the CPU runs the GPU kernel in interpret mode (for tests).

    mesh, num_kv_heads: the engine's mesh (None on one device) and the model's kv heads. The
    Pallas kernels are per-device programs, so on a mesh they run per device over its "tp" axis
    (shard_map), which needs the kv heads to split evenly over it. When tp does not divide
    num_kv_heads the KV pools are replicated instead: "auto" takes the XLA path (which XLA
    partitions itself) and "pallas" is refused.
    """
    from jaxinfer.models.paged_attention_pallas import PagedAttentionPallas
    from jaxinfer.models.paged_attention_xla import PagedAttentionXLA

    platform = platform or jax.default_backend()
    tp = mesh.shape["tp"] if mesh is not None else 1
    if tp > 1 and num_kv_heads is None:
        raise ValueError("num_kv_heads is needed with a mesh")
    splits_kv = tp == 1 or num_kv_heads % tp == 0
    if name == "auto":
        name = "xla" if platform == "cpu" or not splits_kv else "pallas"
    if name == "pallas" and not splits_kv:
        raise ValueError(f"attention_backend='pallas' splits the kv heads over tensor_parallel_size={tp} "
                         f"devices, which does not divide the model's {num_kv_heads} kv heads (the KV cache "
                         "is replicated on every device); use 'xla' or 'auto'")
    if name == "xla":
        return PagedAttentionXLA()
    mesh = mesh if tp > 1 else None
    if platform == "tpu":
        return PagedAttentionPallas(platform="tpu", mesh=mesh)
    return PagedAttentionPallas(platform="gpu", interpret=platform != "gpu", mesh=mesh)


def smallest_token_bucket(platform: str | None = None) -> int:
    """The smallest step shape. On the CPU a decode's projections cost in proportion to the rows
    (1 token instead of 8: measured 27 vs 37 ms a step for the demo model on 2 cores); on an
    accelerator up to 8 rows cost what 1 does, and fewer buckets compile faster."""
    return 1 if (platform or jax.default_backend()) == "cpu" else 8


def resolve_linear(name: str, *, platform: str | None = None, mesh=None) -> Linear:
    """The projection hook for an EngineConfig.linear_kernel value.

    "auto" takes the Pallas skinny-matmul kernel for decode-sized steps on one GPU and XLA's
    dot elsewhere; "pallas" on the CPU runs the kernel in interpret mode (tests). On a mesh
    the projections stay XLA's (a Pallas kernel is a per-device program XLA cannot partition).
    """
    platform = platform or jax.default_backend()
    if name == "auto":
        name = "pallas" if platform == "gpu" and mesh is None else "xla"
    if name == "pallas" and mesh is not None:
        raise ValueError("linear_kernel='pallas' runs on one device; use 'xla' or 'auto' with tensor parallelism")
    return Linear(kernel=name, interpret=name == "pallas" and platform != "gpu")


def _logprob_entry(token_id: int, lp, row: int, top_n: int) -> dict[int, Logprob]:
    """{token: Logprob} for the chosen token (with its exact rank), then the row's top-n."""
    entry = {token_id: Logprob(float(lp.token_logprobs[row]), int(lp.token_ranks[row]))}
    for j in range(top_n):
        entry.setdefault(int(lp.top_ids[row, j]), Logprob(float(lp.top_logprobs[row, j]), j + 1))
    return entry


def _whole_completion(c: _Completion) -> CompletionOutput:
    """A completion's output so far, whole (cumulative outputs, the response cache)."""
    return CompletionOutput(
        index=c.index, text=c.detokenizer.output_text if c.detokenizer is not None else "",
        token_ids=c.request.output_token_ids, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
        logprobs=list(c.logprobs) if c.logprobs is not None else None,
        cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None)


class LLMEngine:
    """Continuous-batching engine over one model replica.

    Args:
      model: a loaded model (config, parameters on the device, tokenizer or None).
      config: engine settings.
      devices: the config.tensor_parallel_size devices this replica runs on; a data-parallel
        front end gives each replica its own (engine/data_parallel.py). Default: with tp > 1
        the first tp of `jax.devices()`, with tp == 1 wherever the parameters are.
    """

    def __init__(self, model, config: EngineConfig = EngineConfig(), *, kv_fill: float = 0.0,
                 devices: Sequence[jax.Device] | None = None):
        self.model = model
        self.model_config = model.config
        self.tokenizer = model.tokenizer
        self.config = config
        mc = model.config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if config.compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
            # Every program is cached, however fast it compiled: a warm start compiles nothing.
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        from jaxinfer.quantization import quantization_method, quantize_params

        if config.quantization is not None:
            held = quantization_method(model.params)
            if config.quantization in CHECKPOINT_QUANTIZATION:
                if held is None:
                    raise ValueError(f"quantization={config.quantization!r} runs a checkpoint's own quantized "
                                     "weights, but this model's projections are floats")
            elif held is None:
                t0 = time.perf_counter()
                model.params = quantize_params(model.params, config.quantization, config.quantization_group_size)
                # The KV cache is sized from the memory in use: the float weights must be gone.
                jax.block_until_ready(model.params)
                logger.info("quantized the projections to %s in %.1f s", config.quantization,
                            time.perf_counter() - t0)
            elif held != config.quantization:
                raise ValueError(f"the model's projections are quantized as {held}; quantization="
                                 f"{config.quantization!r} needs the float checkpoint")
        if config.tensor_parallel_size > 1 and quantization_method(model.params) is not None:
            raise ValueError("quantized weights with tensor_parallel_size > 1 are not supported yet: the "
                             "sharding rules do not cover quantized weights")
        mesh, kv_sharding = self._place_on_mesh(model, config.tensor_parallel_size, config.enable_expert_parallel,
                                                devices)
        unroll_max_tokens, unrolled_params = 0, None
        if config.scan_layers is False and layers_are_stacked(model.params):
            # Per-layer arrays replace the stacked ones in the model too, so memory is not doubled.
            model.params = unstack_layers(model.params)
        elif (config.scan_layers is None and jax.default_backend() == "cpu" and mesh is None
              and layers_are_stacked(model.params)):
            # On the CPU, a decode runs unrolled over per-layer views of the stacked weights (no
            # copy): XLA's CPU backend copies a layer's weights out of a stack before each dot,
            # 30% of a decode step. Larger steps keep the scan, which compiles 6x faster.
            unroll_max_tokens, unrolled_params = 1, layer_views(model.params)
        linear = resolve_linear(config.linear_kernel, mesh=mesh)
        # Unrolling the small steps over the stacked weights on a GPU measured 5-7% faster decode
        # (594 -> 435 kernels a step for the 8B shape) but a warm start of 14.4 s instead of
        # 10.1 (the unrolled executables load slowly): not the default (benchmarks/NOTES.md).
        weights_dtype = param_dtype(model.params)
        fp8_kv = config.kv_cache_dtype in FP8_KV_CACHE_DTYPES
        kv_dtype = (weights_dtype if config.kv_cache_dtype == "auto" else
                    jnp.dtype(jnp.float8_e4m3fn) if fp8_kv else jnp.dtype(config.kv_cache_dtype))
        backend = config.attention_backend
        attention = resolve_attention_backend(backend, mesh=mesh, num_kv_heads=mc.num_kv_heads)
        if fp8_kv and getattr(attention, "platform", "gpu") == "tpu":
            # The GPU kernels upcast float8 pages after the load; the TPU kernels do not yet.
            if backend == "pallas":
                raise ValueError("kv_cache_dtype='fp8' on a TPU runs on attention_backend='xla' (the TPU "
                                 "kernels read 16- and 32-bit caches); use 'auto' or 'xla'")
            attention = resolve_attention_backend("xla")
        # The draft model's KV pool is allocated before the target's is sized from free memory.
        self.draft = self._draft_proposer(config, attention, kv_dtype) if config.speculative_config else None
        # A kernel that tiles only some head sizes keeps its cache zero-padded to one.
        cache_head_dim = attention.cache_head_dim(mc.head_dim)
        num_pages = config.num_pages
        if num_pages is None:
            sizing = self._sizing_config(config, mc, kv_dtype, cache_head_dim, param_dtype(model.params))
            num_pages = pages_for_memory_fraction(sizing, config.page_size, kv_dtype,
                                                  config.kv_cache_memory_fraction, head_dim=cache_head_dim)
            if num_pages is not None and kv_sharding is not None and kv_sharding.spec[0] is not None:
                num_pages *= mesh.shape["tp"]  # each device holds only its share of the kv heads
        if num_pages is None:
            num_pages = DEFAULT_HOST_KV_BYTES // KVCacheSpec.bytes_per_page(mc, config.page_size, kv_dtype,
                                                                            cache_head_dim)
        # A request must be able to fit on its own, or it could never finish.
        fits = (num_pages - 1) * config.page_size
        if self.max_model_len > fits:
            if config.max_model_len is not None:
                raise ValueError(f"KV cache of {num_pages} pages cannot hold one sequence of max_model_len="
                                 f"{self.max_model_len} ({config.page_size} tokens a page); lower "
                                 "max_model_len or give the cache more memory")
            logger.warning("max_model_len lowered from %d to %d to fit the KV cache", self.max_model_len, fits)
            self.max_model_len = fits
        self.kv_spec = KVCacheSpec(mc.num_layers, mc.num_kv_heads, cache_head_dim, config.page_size, num_pages,
                                   jnp.dtype(kv_dtype).name)
        self.eos_token_ids = tuple(self.tokenizer.eos_token_ids) if self.tokenizer else mc.eos_token_ids
        max_num_spec_tokens = self._max_num_spec_tokens(config)
        self._async = (config.async_scheduling if config.async_scheduling is not None
                       else jax.default_backend() != "cpu")
        self.num_host_pages = self._host_pages(config, self.kv_spec)
        # Cached pages are shared only within this model's identity (weights' shape and kind,
        # the cache's dtype and head size): the namespace every hash chain starts from.
        namespace = repr((mc, self.kv_spec.dtype, cache_head_dim, config.quantization, weights_dtype.name)).encode()
        self.block_manager = BlockManager(num_pages, config.page_size,
                                          enable_prefix_caching=config.enable_prefix_caching,
                                          num_host_pages=self.num_host_pages, namespace=namespace)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=self.max_model_len, page_size=config.page_size,
                            policy=config.scheduling_policy,
                            max_steps_in_flight=2 if self._async else 1,
                            max_num_spec_tokens=max_num_spec_tokens),
            self.block_manager)
        self.runner = ModelRunner(
            mc, model.graphdef, model.params, self.kv_spec,
            RunnerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                         max_model_len=self.max_model_len, page_size=config.page_size,
                         min_token_bucket=smallest_token_bucket(),
                         max_num_spec_tokens=max_num_spec_tokens),
            attention,
            linear=linear, eos_token_ids=self.eos_token_ids, kv_fill=kv_fill, kv_sharding=kv_sharding,
            unroll_max_tokens=unroll_max_tokens, unrolled_params=unrolled_params, scan_unroll=config.scan_unroll,
            num_host_pages=self.num_host_pages)
        self.eagle = self._eagle_proposer(config, attention, kv_dtype, linear) if config.speculative_config else None
        self.mesh = mesh
        self.metrics = EngineMetrics()
        self.speculative = config.speculative_config
        # Proposals throttle themselves: a request whose proposals all fail waits 1, 2, 4, ...
        # 16 rounds before proposing again; a round in which no request had a proposal lets
        # the next few steps run asynchronously (no proposal needs their tokens).
        self._spec_backoff: dict[str, tuple[int, int]] = {}  # request id -> (rounds left, level)
        self._spec_async_steps = 0
        self._token_histories = TokenHistories()  # n-gram lookups read these, extended as tokens come
        # Whether proposing pays, measured per batch size (speculative.SpeculationGovernor).
        self._governor = (SpeculationGovernor() if self.speculative is not None and self.speculative.adaptive
                          else None)
        self._last_step_end: float | None = None
        self._groups: dict[str, _Group] = {}
        self._completions: dict[str, _Completion] = {}  # scheduler request id -> completion
        self._seed_rng = np.random.default_rng(config.seed)
        self._in_flight: _LaunchedStep | None = None
        # A step whose sampler waits for its grammar mask, and the mask being filled (a future).
        self._masked: tuple[_LaunchedStep, object] | None = None
        self.response_cache = ResponseCache(config.response_cache_size) if config.response_cache_size else None
        self._replayed: dict[str, RequestOutput] = {}  # cached responses not yet returned by step()
        # Grammar state; the llguidance tokenizer is built only when a structured request arrives.
        self.structured = StructuredOutputs(self.tokenizer, mc.vocab_size, self.eos_token_ids)
        # Seconds of each warm-up phase (`jaxinfer bench startup` reports them).
        self.startup_seconds: dict[str, float] = {}
        if config.warmup:
            t0 = time.perf_counter()
            count = self.runner.precompile()
            t1 = time.perf_counter()
            logger.info("compiled %d programs in parallel in %.1f s", count, t1 - t0)
            self.runner.warmup()
            for proposer in (self.draft, self.eagle):
                if proposer is not None:
                    proposer.warmup()
            self.startup_seconds = {"compile": t1 - t0, "first_runs": time.perf_counter() - t1}

    @staticmethod
    def _max_num_spec_tokens(config: EngineConfig) -> int:
        """Most proposed tokens verified in one step: k for at most MAX_VERIFYING_REQUESTS
        requests (or `disable_by_batch_size`). Every step shape gets as many more logits rows
        (LM head and sampler rows), so the bound keeps steps without proposals cheap; past a
        dozen or so requests, verification stops paying anyway (benchmarks/NOTES.md)."""
        spec = config.speculative_config
        if spec is None:
            return 0
        requests = min(config.max_num_seqs, spec.disable_by_batch_size or MAX_VERIFYING_REQUESTS)
        return spec.num_speculative_tokens * requests

    def _draft_proposer(self, config: EngineConfig, attention, kv_dtype):
        """The draft model's proposer (method "draft_model"), or None."""
        spec = config.speculative_config
        if spec.method != "draft_model":
            return None
        if config.tensor_parallel_size > 1:
            raise ValueError("a draft model runs on one device; tensor_parallel_size > 1 is not supported with it yet")
        from jaxinfer.engine.draft_model import DraftModelProposer
        from jaxinfer.loading.loader import LoadedModel, load_model

        draft = spec.model
        if not isinstance(draft, LoadedModel):
            draft = load_model(draft, dtype=param_dtype(self.model.params), load_tokenizer=False)
        return DraftModelProposer(draft, self.model_config, max_num_seqs=config.max_num_seqs,
                                  max_model_len=self.max_model_len,
                                  max_num_batched_tokens=config.max_num_batched_tokens,
                                  page_size=config.page_size, attention=attention, kv_dtype=kv_dtype,
                                  min_token_bucket=smallest_token_bucket())

    @staticmethod
    def _sizing_config(config: EngineConfig, mc, kv_dtype, cache_head_dim: int, feature_dtype):
        """The model config the KV pool is sized by: with an EAGLE head, each page also holds
        the head's layer of KV and every token's feature (D values in the model's dtype, which
        an fp8 cache does not share), counted as whole KV layers by their bytes."""
        spec = config.speculative_config
        if spec is None or spec.method != "eagle":
            return mc
        layer_bytes = 2 * mc.num_kv_heads * cache_head_dim * jnp.dtype(kv_dtype).itemsize
        feature_layers = -(-mc.hidden_size * jnp.dtype(feature_dtype).itemsize // layer_bytes)
        return dataclasses.replace(mc, num_layers=mc.num_layers + 1 + feature_layers,
                                   sliding_windows=(None,) * (mc.num_layers + 1 + feature_layers))

    def _eagle_proposer(self, config: EngineConfig, attention, kv_dtype, linear):
        """The EAGLE head's proposer (method "eagle"), or None; the runner keeps features."""
        spec = config.speculative_config
        if spec.method != "eagle":
            return None
        if config.tensor_parallel_size > 1:
            raise ValueError("an EAGLE head runs on one device; tensor_parallel_size > 1 is not supported with it yet")
        from jaxinfer.engine.eagle_proposer import EagleProposer
        from jaxinfer.loading.eagle import load_eagle_head

        graphdef, state = load_eagle_head(spec.model, self.model_config, dtype=param_dtype(self.model.params))
        self.runner.keep_features()
        return EagleProposer(graphdef, state, self.runner, self.model.graphdef,
                             num_speculative_tokens=spec.num_speculative_tokens, max_num_seqs=config.max_num_seqs,
                             max_model_len=self.max_model_len, max_num_batched_tokens=config.max_num_batched_tokens,
                             page_size=config.page_size, attention=attention, kv_dtype=kv_dtype,
                             min_token_bucket=smallest_token_bucket(), linear=linear)

    @staticmethod
    def _host_pages(config: EngineConfig, kv_spec: KVCacheSpec) -> int:
        """Pages of the host KV tier: config.kv_offloading_size GiB of whole pages (0: none)."""
        if config.kv_offloading_size is None:
            return 0
        page_bytes = kv_spec.total_bytes // kv_spec.num_pages
        num = int(config.kv_offloading_size * 2**30) // page_bytes
        if num < 1:
            raise ValueError(f"kv_offloading_size={config.kv_offloading_size} GiB holds no page of "
                             f"{page_bytes} bytes")
        return num

    @staticmethod
    def _place_on_mesh(model, tp: int, expert_parallel: bool = False, devices=None):
        """Places the model's parameters on the engine's devices (once: the model keeps the placed
        tree, so the other copy is freed) and returns (mesh, KV pool sharding).

        With tp > 1: a mesh over `devices` (default: the first tp of `jax.devices()`), the
        parameters split by the rules table. With tp == 1 and a device given: (None, a sharding
        of the pools on that device alone), the parameters copied there; the runner places its
        step inputs where the pools are, so a replica never touches another's device. With
        tp == 1 and no device: (None, None), the parameters stay as they are.
        `expert_parallel`: whole experts split over the devices (models/moe.py)."""
        from jax.sharding import NamedSharding, PartitionSpec

        from jaxinfer.sharding import is_placed, kv_cache_sharding, make_mesh, param_shardings
        from jaxinfer.sharding.rules import DEFAULT_RULES, EXPERT_PARALLEL_RULES

        if expert_parallel and not model.config.is_moe:
            raise ValueError(f"enable_expert_parallel needs a mixture-of-experts model; "
                             f"{model.config.model_type!r} has no experts")
        if devices is not None:
            devices = list(devices)
            if len(devices) != tp:
                raise ValueError(f"tensor_parallel_size={tp} runs on {tp} device(s); the engine was given "
                                 f"{len(devices)}")
        if tp == 1:
            if devices is None:
                return None, None
            model.params = jax.device_put(model.params, devices[0])
            return None, NamedSharding(make_mesh(devices=devices), PartitionSpec(None, None, None, None, None))
        mesh = make_mesh(tp=tp, devices=devices)
        if expert_parallel:
            from jaxinfer.models.moe import expert_parallel as with_experts_split

            model.graphdef, model.params = with_experts_split(model.graphdef, model.params, mesh)
        shardings = param_shardings(model.config, mesh, EXPERT_PARALLEL_RULES if expert_parallel else DEFAULT_RULES)
        if not is_placed(model.params, shardings):
            model.params = jax.device_put(model.params, shardings)
        return mesh, kv_cache_sharding(model.config, mesh)

    # -- requests ---------------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                text = prompt.get("prompt")
            elif "prompt" in prompt:
                return self._tokenize(prompt["prompt"])
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]}")
            return prompt, self.tokenizer.encode(prompt)
        else:
            ids, text = prompt, None
        ids = list(ids)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is not an integer in [0, {vocab})")
        return text, [int(t) for t in ids]

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None, *,
                    arrival_time: float | None = None, priority: int = 0, cache_salt: str | None = None) -> None:
        """Queues a request; raises ValueError (changing nothing) when it cannot be served.

        cache_salt (or a prompt dict's "cache_salt", as in vLLM): requests share cached prefix
        pages only with requests of the same salt (e.g. one per tenant)."""
        params = params or SamplingParams()
        if self.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids, cache_salt = self.check_request(prompt, params, cache_salt)
        self._queue(request_id, text, ids, params, arrival_time, priority, cache_salt)

    def check_request(self, prompt: PromptType, params: SamplingParams,
                      cache_salt: str | None = None) -> tuple[str | None, list[int], str | None]:
        """What add_request checks before queueing anything: raises ValueError when the request
        cannot be served; returns (prompt text, prompt token ids, cache salt)."""
        if isinstance(prompt, dict) and prompt.get("cache_salt") is not None:
            if cache_salt is not None and cache_salt != prompt["cache_salt"]:
                raise ValueError("cache_salt is given twice, with different values")
            cache_salt = prompt["cache_salt"]
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {cache_salt!r}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room to generate within max_model_len="
                             f"{self.max_model_len}")
        if params.logit_bias and max(params.logit_bias) >= self.model_config.vocab_size:
            raise ValueError(f"logit_bias token id {max(params.logit_bias)} is outside the vocabulary")
        widths = self.runner.sampling_widths
        if len(params.logit_bias or ()) > widths.logit_bias:
            raise ValueError(f"logit_bias has {len(params.logit_bias)} entries; at most {widths.logit_bias} "
                             "are supported")
        if params.min_tokens and len(params.stop_ids(self.eos_token_ids)) > widths.banned_ids:
            raise ValueError(f"min_tokens suppresses {len(params.stop_ids(self.eos_token_ids))} stop and eos "
                             f"ids; at most {widths.banned_ids} are supported")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        if params.structured_outputs:  # compiled (and cached) here, so a bad constraint is refused
            self.structured.compile(params.structured_outputs)
        return text, ids, cache_salt

    def prepare_structured_outputs(self, params_list: Sequence[SamplingParams]) -> None:
        """Compiles a batch's new structured-output constraints in parallel before its requests
        are added (see `StructuredOutputs.prepare`); ValueError for an invalid one."""
        constraints = [p.structured_outputs for p in params_list
                       if isinstance(p, SamplingParams) and p.structured_outputs]
        if constraints:
            self.structured.prepare(constraints)

    def _queue(self, request_id, text, ids, params, arrival_time, priority, cache_salt) -> None:
        arrival = time.monotonic() if arrival_time is None else arrival_time
        response_key = None
        if self.response_cache is not None:
            response_key = ResponseCache.key(ids, params, cache_salt)
            cached = self.response_cache.get(response_key) if response_key is not None else None
            if cached is not None:
                self._replay(request_id, text, ids, params, arrival, *cached)
                return
        # A fresh matcher from the template check_request compiled and cached.
        grammar = self.structured.compile(params.structured_outputs) if params.structured_outputs else None
        params = params.with_seed(int(self._seed_rng.integers(0, 2**62)))
        group = _Group(request_id, text, ids, params, RequestMetrics(arrival_time=arrival),
                       prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
                       response_key=response_key)
        for i in range(params.n):
            p = params.for_sample(i)
            sub_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(sub_id, ids, max_tokens=p.max_tokens, min_tokens=p.min_tokens,
                          eos_token_ids=self.eos_token_ids, stop_token_ids=p.stop_token_ids,
                          ignore_eos=p.ignore_eos, priority=priority, arrival_time=arrival,
                          use_prefix_cache=p.prompt_logprobs is None, cache_salt=cache_salt)
            detok = (IncrementalDetokenizer.from_params(self.tokenizer, ids, p) if self.tokenizer else None)
            group.completions.append(_Completion(group, i, req, p, detok, [] if p.logprobs is not None else None,
                                                 grammar=None if grammar is None else
                                                 grammar if i == 0 else grammar.fork()))
        leader = group.completions[0].request
        self.scheduler.add_request(leader)
        for c in group.completions[1:]:
            self.scheduler.add_request(c.request, fork_from=leader.request_id)
        self._groups[request_id] = group
        for c in group.completions:
            self._completions[c.request.request_id] = c

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Aborts requests (unknown or finished ids are ignored); their pages are freed at once."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        sub_ids = []
        now = time.monotonic()
        for rid in request_ids:
            group = self._groups.pop(rid, None)
            if group is None:
                if self._replayed.pop(rid, None) is not None:
                    self.metrics.record_finished("abort", 0.0)
                continue
            self.metrics.record_finished("abort", now - group.metrics.arrival_time)
            for c in group.completions:
                sub_ids.append(c.request.request_id)
                self._completions.pop(c.request.request_id, None)
        self.scheduler.abort_requests(sub_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups or self._replayed)

    def has_request(self, request_id: str) -> bool:
        """Whether an unfinished request holds this id."""
        return request_id in self._groups or request_id in self._replayed

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups) + len(self._replayed)

    def _replay(self, request_id, text, ids, params, arrival, completions, prompt_logprobs) -> None:
        """Answers a request from the response cache: its output comes with the next step()."""
        now = time.monotonic()
        metrics = RequestMetrics(arrival_time=arrival, first_scheduled_time=now, first_token_time=now,
                                 last_token_time=now, finished_time=now)
        self._replayed[request_id] = RequestOutput(request_id=request_id, prompt=text, prompt_token_ids=ids,
                                                   outputs=completions, finished=True, metrics=metrics,
                                                   prompt_logprobs=prompt_logprobs)

    def _store_response(self, group: _Group) -> None:
        """Keeps a finished group's whole completions (whatever its output kind streamed)."""
        if group.response_key is None or any(c.finish_reason == "abort" for c in group.completions):
            return
        self.response_cache.put(group.response_key, [_whole_completion(c) for c in group.completions],
                                group.prompt_logprobs)

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules and runs one step; returns outputs of requests that progressed.

        With asynchronous scheduling the step is queued on the device and the previous one's
        tokens are read while it runs: the outputs returned are the previous step's, so the
        host's bookkeeping overlaps the device's work. A token sampled for a request that its
        previous token turned out to stop is dropped.
        """
        outputs: list[RequestOutput] = []
        if self._replayed:
            outputs = list(self._replayed.values())
            self._replayed = {}
            for out in outputs:
                self.metrics.record_finished(out.outputs[0].finish_reason, 0.0)
            self._record_cache_queries()
            if not self._groups:
                return outputs
        spec_on = self._speculating()
        tokens_before = self.metrics.generation_tokens_total
        if spec_on and self._spec_async_steps and self._in_flight is not None:
            self._spec_async_steps -= 1
        elif spec_on:
            # Proposals need each request's last token: the step in flight is read first (so
            # speculation runs without the async overlap, which only helps at large batches,
            # where `disable_by_batch_size` turns proposals off and the overlap on again).
            if self._in_flight is not None:
                outputs += self._finish_step(self._in_flight)
                self._in_flight = None
            self._propose()
        if self.runner.host_kv is not None:  # host-tier pages whose memory went: before planning
            self.block_manager.drop_host_slots(self.runner.host_kv.take_dropped())
        out = self.scheduler.schedule()
        launched = self._launch(out)
        if self._in_flight is not None:
            # With a structured row in `launched`, its sampler is queued from inside, as soon
            # as the previous step's tokens have advanced the matchers (before its outputs).
            outputs += self._finish_step(self._in_flight, then_sample=launched)
            self._in_flight = None
        if launched is not None and launched.needs_mask:
            self._start_masked_sampler(launched)  # no step was in flight: its mask starts now
        if launched is None:
            if not outputs:
                self._record_step(0, 0, [], [])
        elif self._async:
            self._in_flight = launched
        else:
            outputs += self._finish_step(launched)
        if self._governor is not None:
            now = time.monotonic()
            if self._last_step_end is not None and self.scheduler.num_running:
                self._governor.record(self.scheduler.num_running, spec_on, now - self._last_step_end,
                                      self.metrics.generation_tokens_total - tokens_before)
            self._last_step_end = now if self.scheduler.num_running else None
        return outputs

    def _speculating(self) -> bool:
        spec = self.speculative
        if spec is None or (spec.disable_by_batch_size is not None
                            and self.scheduler.num_running > spec.disable_by_batch_size):
            return False
        return self._governor is None or self._governor.speculate(max(1, self.scheduler.num_running))

    def _propose(self) -> None:
        """Proposes tokens for every request that decodes next and may speculate: its last
        token known (no step of its in flight), no penalties or grammar (both depend on each
        token before the next), not opted out, and room for more than one more token."""
        spec = self.speculative
        running = self.scheduler.running_requests
        wanted = []  # (request, k)
        for req in running:
            if req.num_output_placeholders or req.num_computed_tokens != req.num_tokens - 1:
                continue
            c = self._completions.get(req.request_id)
            if c is None or c.grammar is not None or c.params.has_penalties or not c.params.speculative:
                continue
            room = self.max_model_len - req.num_tokens
            if req.max_tokens is not None:
                room = min(room, req.max_tokens - req.num_output_tokens)
            k = min(spec.num_speculative_tokens, room - 1)
            left, level = self._spec_backoff.get(req.request_id, (0, 0))
            if left:
                self._spec_backoff[req.request_id] = (left - 1, level)
            elif k > 0:
                wanted.append((req, k))
        if self.eagle is not None:
            self.eagle.release({r.request_id for r in running})
            bm = self.block_manager
            proposals = self.eagle.propose(
                [(req.request_id, req.all_token_ids, k, req.num_preemptions) for req, k in wanted],
                {req.request_id: bm.block_table(req.request_id) for req, _ in wanted})
            for req, _ in wanted:
                req.spec_token_ids = proposals.get(req.request_id, [])
        elif self.draft is None:
            for req, k in wanted:
                tokens = self._token_histories.view(req.request_id, req.all_token_ids)
                req.spec_token_ids = ngram_proposal(tokens, min_n=spec.prompt_lookup_min,
                                                    max_n=spec.prompt_lookup_max, k=k)
        else:
            self.draft.release({r.request_id for r in running})
            proposals = self.draft.propose([(req.request_id, req.all_token_ids, k) for req, k in wanted])
            for req, _ in wanted:
                req.spec_token_ids = proposals.get(req.request_id, [])
        if max(len(self._spec_backoff), len(self._token_histories)) > 2 * len(running):  # forget those that left
            live = {r.request_id for r in running}
            self._spec_backoff = {rid: v for rid, v in self._spec_backoff.items() if rid in live}
            self._token_histories.keep_only(live)
        if self._async and not any(req.spec_token_ids for req, _ in wanted):
            self._spec_async_steps = ASYNC_STEPS_WITHOUT_PROPOSALS

    def _launch(self, out) -> "_LaunchedStep | None":
        """Queues a scheduled step on the device (None for an empty step)."""
        if out.total_num_scheduled_tokens == 0:
            # Hands over finished ids, so the runner forgets them.
            self.runner.dispatch(out, [], before_forward=self._flush_masked_sampler)
            return None
        now = time.monotonic()
        wanted = {}  # request id -> prompt logprobs top-n
        num_prompt_tokens = 0
        for rid, n in out.num_scheduled_tokens.items():
            c = self._completions[rid]
            if c.group.metrics.first_scheduled_time is None:
                c.group.metrics.first_scheduled_time = now
            if c.index == 0 and c.params.prompt_logprobs is not None:
                wanted[rid] = c.params.prompt_logprobs
            req = c.request
            # vLLM's prompt_tokens counts each request's whole prompt once, whether its tokens
            # were computed, found in the prefix cache, or computed again after a preemption.
            if not c.prompt_counted:
                c.prompt_counted = True
                num_prompt_tokens += req.num_prompt_tokens
        rows = []
        needs_mask = False
        for rid in out.sampling_req_ids:
            c = self._completions[rid]
            req = c.request
            needs_mask |= c.grammar is not None
            # Tokens of earlier steps still in flight (this step's own placeholder excluded).
            pending = max(0, req.num_output_placeholders - 1)
            outputs = req.output_view  # no copy: only its length is read, and at a penalty slot's first use
            # With proposals, row j samples the step's j-th token and verifies proposal j (the
            # last row has none): k + 1 rows, each counting the outputs before its token.
            drafts = out.spec_token_ids.get(rid, ())
            rows += [SamplingRow(c.params, req.prompt_token_ids, outputs, pending + j,
                                 draft_token_id=drafts[j] if j < len(drafts) else -1)
                     for j in range(len(drafts) + 1)]
        # A structured row's mask needs the previous step's token, which the host reads only
        # after this call: the forward pass goes first, the sampler once the mask is known.
        pending = self.runner.dispatch(out, rows, wanted, defer_sampling=needs_mask,
                                       before_forward=self._flush_masked_sampler)
        return _LaunchedStep(out, pending, num_prompt_tokens, needs_mask)

    def _mask_grammars(self, launched: _LaunchedStep) -> list:
        """The grammar of each row of a step's deferred sampler (matchers up to date with every
        token before this step's); None for rows of requests that ended meanwhile (their token
        is dropped), for proposal rows, and for the sampler's padding rows, so the mask is
        filled at the sampler's size and sent as it is."""
        launched.needs_mask = False
        grammars = []
        for rid in launched.out.sampling_req_ids:
            c = self._completions.get(rid)
            live = c is not None and not c.request.is_finished
            grammars.append(c.grammar if live else None)
            # Rows of proposals (requests with grammars never have any) are not masked.
            grammars += [None] * len(launched.out.spec_token_ids.get(rid, ()))
        return grammars + [None] * (launched.pending.deferred_rows - len(grammars))

    def _start_masked_sampler(self, launched: _LaunchedStep) -> None:
        """Starts filling the step's grammar bitmask in the mask thread; the sampler is queued
        by `_flush_masked_sampler` just before the next forward pass (which reads its tokens),
        so the fill overlaps this step's outputs and the next step's scheduling and inputs."""
        self._masked = (launched, self.structured.fill_bitmask_async(self._mask_grammars(launched)))

    def _flush_masked_sampler(self) -> None:
        if self._masked is not None:
            launched, mask = self._masked
            self._masked = None
            self.runner.sample_deferred(launched.pending, mask.result())

    def _finish_step(self, launched: "_LaunchedStep", then_sample: "_LaunchedStep | None" = None
                     ) -> list[RequestOutput]:
        """Waits for a launched step, applies its tokens and builds the outputs. then_sample:
        the next step, whose grammar mask starts filling once the matchers have this step's
        tokens, before the outputs are built (its sampler is queued before the forward pass
        after it)."""
        self._flush_masked_sampler()  # this step's own sampler, if its mask was still filling
        out = launched.out
        result = launched.pending.result()
        for rid, (first, lp) in result.prompt_logprobs.items():
            c = self._completions.get(rid)
            if c is not None:
                self._record_prompt_logprobs(c, first, lp)
        sampled = result.sampled
        rows, tokens = self._step_tokens(out, sampled)
        accepted = {r.request_id for r in self.scheduler.update_from_output(out, tokens)}
        # Tokens of requests that ended meanwhile (a stop found a step late, an abort) are
        # dropped; the scheduler cut each list to the tokens it took (none after a stop).
        tokens = {rid: t for rid, t in tokens.items() if rid in accepted}
        advances = []
        for rid in tokens:
            c = self._completions.get(rid)
            if c is not None:
                for j in range(len(tokens[rid])):
                    self._record_logprobs(c, sampled, rows[rid] + j)
                if c.grammar is not None:
                    advances += [(c.grammar, t) for t in tokens[rid]]
        if advances:
            self.structured.accept_tokens(advances)
        if then_sample is not None and then_sample.needs_mask:
            self._start_masked_sampler(then_sample)
        return self._process_outputs(tokens, launched.num_prompt_tokens)

    def _step_tokens(self, out, sampled) -> tuple[dict[str, int], dict[str, list[int]]]:
        """Each sampling request's first row and its tokens: one, or with proposals the
        accepted ones and the token after them (the correction, or one more when all passed)."""
        rows, tokens = {}, {}
        row = 0
        spec = out.spec_token_ids
        for rid in out.sampling_req_ids:
            k = len(spec.get(rid, ()))
            rows[rid] = row
            n = 0
            while n < k and sampled.accepted[row + n]:
                n += 1
            tokens[rid] = [int(t) for t in sampled.token_ids[row:row + n + 1]]
            if k:
                self.metrics.record_spec_decode(k, n)
                level = 0 if n else min(2 * self._spec_backoff.get(rid, (0, 0))[1] or 1, MAX_PROPOSAL_BACKOFF)
                self._spec_backoff[rid] = (level, level)
            row += k + 1
        return rows, tokens

    def _record_logprobs(self, c: _Completion, sampled, i: int):
        if c.logprobs is None or sampled.logprobs is None:
            return
        lp = sampled.logprobs
        c.logprobs.append(_logprob_entry(int(sampled.token_ids[i]), lp, i, c.params.logprobs))
        c.cumulative_logprob += float(lp.token_logprobs[i])

    def _record_prompt_logprobs(self, c: _Completion, first: int, lp):
        """Appends prompt positions not yet scored (a recompute after preemption scores again)."""
        scored = c.group.prompt_logprobs
        for j in range(len(lp.token_logprobs)):
            if first + j != len(scored):
                continue
            scored.append(_logprob_entry(c.request.prompt_token_ids[first + j], lp, j, c.params.prompt_logprobs))

    def _process_outputs(self, tokens: dict[str, list[int]], num_prompt_tokens: int) -> list[RequestOutput]:
        now = time.monotonic()
        touched: dict[str, _Group] = {}
        ttfts, itls = [], []
        for rid, new_ids in tokens.items():
            c = self._completions.get(rid)
            if c is None:
                continue
            m = c.group.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                ttfts.append(now - m.arrival_time)
            elif m.last_token_time is not None and c.index == 0:
                itls.append(now - m.last_token_time)
            if c.index == 0:
                m.last_token_time = now
                m.token_times.append(now)
            req = c.request
            if c.grammar is not None and c.grammar.compile_error is not None and c.finish_reason is None:
                # Its grammar never compiled: the request ends here ("abort"), not the engine; the
                # token its end-of-sequence-only mask produced is not shown.
                if not req.is_finished:
                    self.scheduler.finish_requests([rid], "abort")
                c.finish_reason = "abort"
                new_ids = []
            # The grammar admits nothing more: the output is complete (finish_reason "stop").
            grammar_done = c.grammar is not None and c.grammar.is_terminated and not req.is_finished
            if c.detokenizer is not None:
                is_stop_token = req.is_finished and req.finish_reason == "stop"
                delta, stop_str = c.detokenizer.add_tokens(new_ids, last_is_stop_token=is_stop_token)
                if stop_str is not None:
                    c.finish_reason, c.stop_reason = "stop", stop_str
                    if not req.is_finished:
                        self.scheduler.finish_requests([rid], "stop")
                else:
                    if grammar_done:
                        self.scheduler.finish_requests([rid], "stop")
                    if req.is_finished:
                        delta += c.detokenizer.finish()
                c.delta_text += delta
            elif grammar_done:
                self.scheduler.finish_requests([rid], "stop")
            if grammar_done and c.finish_reason is None:
                c.finish_reason = "stop"  # stop_reason stays None: no stop token or string
            if req.is_finished and c.finish_reason is None:
                c.finish_reason = req.finish_reason
                if req.finish_reason == "stop":
                    c.stop_reason = req.output_token_ids[-1]
            touched[c.group.request_id] = c.group
        outputs = []
        for group in touched.values():
            outputs.append(self._make_output(group))
            if group.finished:
                self._store_response(group)
                group.metrics.finished_time = now
                self.metrics.record_finished(group.completions[0].finish_reason, now - group.metrics.arrival_time)
                del self._groups[group.request_id]
                for c in group.completions:
                    self._completions.pop(c.request.request_id, None)
        self._record_step(num_prompt_tokens, len(tokens), ttfts, itls)
        return [o for o in outputs if o is not None]

    def _make_output(self, group: _Group) -> RequestOutput | None:
        kind = group.params.output_kind
        # Preemptions of any of the group's completions (the scheduler counts them per request).
        group.metrics.num_preemptions = sum(c.request.num_preemptions for c in group.completions)
        if kind == RequestOutputKind.FINAL_ONLY and not group.finished:
            return None
        completions = []
        for c in group.completions:
            if kind != RequestOutputKind.DELTA:
                completions.append(_whole_completion(c))
                continue
            # Only the new tokens are sliced out (a fresh list); copying every output token
            # each step made this O(output length) per request per step.
            token_ids = c.request.all_token_ids[c.request.num_prompt_tokens + c.delta_start:]
            logprobs = c.logprobs[c.delta_start:] if c.logprobs is not None else None
            completions.append(CompletionOutput(
                index=c.index, text=c.delta_text, token_ids=token_ids, finish_reason=c.finish_reason,
                stop_reason=c.stop_reason, logprobs=logprobs,
                cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None))
            c.delta_text, c.delta_start = "", c.request.num_output_tokens
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=group.prompt_token_ids, outputs=completions,
                             finished=group.finished, metrics=group.metrics,
                             prompt_logprobs=list(group.prompt_logprobs) if group.prompt_logprobs is not None else None)

    def _record_cache_queries(self):
        if self.response_cache is not None:
            self.metrics.record_response_cache(self.response_cache.num_queries, self.response_cache.num_hits)

    def _record_step(self, num_prompt_tokens: int, num_generation_tokens: int, ttfts, itls):
        self._record_cache_queries()
        s, bm = self.scheduler, self.block_manager
        self.metrics.record_step(num_prompt_tokens=num_prompt_tokens, num_generation_tokens=num_generation_tokens,
                                 num_running=s.num_running, num_waiting=s.num_waiting,
                                 kv_usage=bm.usage, num_preemptions_total=s.num_preemptions_total,
                                 ttfts=ttfts, itls=itls, prefix_cache_queries_total=bm.num_prefix_query_tokens,
                                 prefix_cache_hits_total=bm.num_prefix_hit_tokens,
                                 external_prefix_cache_queries_total=bm.num_external_query_tokens,
                                 external_prefix_cache_hits_total=bm.num_external_hit_tokens)
