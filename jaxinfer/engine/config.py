"""Engine settings: one frozen dataclass, validated on construction (YAML in configs/ overrides it)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

ATTENTION_BACKENDS = ("auto", "xla", "pallas")
LINEAR_KERNELS = ("auto", "xla", "pallas")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "fp8", "fp8_e4m3")
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
QUANTIZATION_METHODS = (None, "int8", "int4", "fp8", "w8a8_int8", "w8a8_fp8", "gguf", "awq", "gptq")
CHECKPOINT_QUANTIZATION = ("gguf", "awq", "gptq")  # the checkpoint's own format, loaded as it is
# On devices that report no memory statistics (the CPU), the KV cache gets this many bytes.
DEFAULT_HOST_KV_BYTES = 256 * 1024 * 1024


def default_compilation_cache_dir() -> str:
    root = os.environ.get("JAXINFER_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer"))
    return os.path.join(root, "jax_compilation_cache")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, caches and compiles.

    Attributes:
      max_model_len: longest prompt + output in tokens (None: the model's context length).
      max_num_seqs: most sequences in one step.
      max_num_batched_tokens: token budget of one step (prefill chunks + decodes).
      page_size: tokens per KV page (a power of two).
      num_pages: KV pages including the scratch page 0 (None: sized from memory).
      kv_cache_memory_fraction: share of the device's free memory given to the KV cache.
      kv_cache_dtype: "auto" (the parameters' dtype), "float32", "bfloat16", or "fp8" (vLLM's
        name; also "fp8_e4m3"): keys and values stored as float8 e4m3 with a scale of 1, as
        vLLM's uncalibrated default, saturated at +-448; half the bytes of bf16. The XLA path
        and the GPU kernels read it (pages upcast after the load); on a TPU it runs on the XLA
        path.
      scheduling_policy: "fcfs" or "priority".
      enable_prefix_caching: reuse KV pages of identical prompt prefixes (on by default, as in
        vLLM: a hit skips computing, a miss costs one hash per full page). Prefixes are shared
        within one model and one request `cache_salt` only.
      kv_offloading_size: GiB of host memory for a second KV tier (vLLM's --kv-offloading-size):
        cached pages evicted from the device pool are copied there and copied back when a later
        prompt's prefix is found there, instead of being recomputed. None: no host tier. Needs
        prefix caching.
      attention_backend: "auto" (Pallas on GPU/TPU, XLA on CPU), "xla" or "pallas".
      linear_kernel: the projections' kernel: "auto" (the Pallas skinny matmul for decode-sized
        steps on one GPU, XLA's dot elsewhere), "xla" or "pallas".
      scan_layers: run the layers in `lax.scan` over stacked weights (True), or unrolled over
        per-layer arrays (False; compiles 6x slower, but XLA's CPU backend copies each layer's
        weights out of a stack before a dot); None: on the CPU, one-token steps unrolled over
        views of the stacked weights and larger steps scanned; elsewhere scanned.
      scan_unroll: layers run per iteration of the scanned loop (lax.scan's unroll): fewer
        iterations, each with its loop-counter update and carry copies (kernels of their own on
        a GPU), against a program with that many layer bodies to compile.
      async_scheduling: plan and queue step N+1 while step N runs on the device, feeding step
        N's sampled ids to N+1 on the device; the host reads tokens one step late and drops
        a token sampled after its request's stop (vLLM's --async-scheduling). Off: every
        step waits for its tokens before the next is planned. None: on for accelerators, off
        on the CPU, where XLA runs a program whose inputs are not ready on the calling thread
        (measured: the demo's time to first token 0.8 -> 1.5 s, decode unchanged).
      seed: seeds requests that bring none, so a run is reproducible.
      compilation_cache_dir: JAX's persistent compilation cache ("" disables it).
      warmup: compile every shape bucket when the engine starts.
      tensor_parallel_size: devices one model replica is split over (heads, mlp width and
        vocabulary; see docs/sharding.md); the first that many of `jax.devices()` are used, or
        the devices the engine is given (LLMEngine's `devices=`).
      data_parallel_size: independent engine replicas, each over its own tensor_parallel_size
        devices (vLLM's name); requests go to the least busy one
        (jaxinfer/engine/data_parallel.py). Read by `LLM` and DataParallelEngine: one
        LLMEngine is one replica and ignores it.
      disaggregate_prefill: prefill-decode disaggregation: prompts are computed by a prefill
        engine on tensor_parallel_size devices and their KV pages move to a decode engine on the
        next tensor_parallel_size devices, which generates (jaxinfer/engine/disaggregated.py).
        Read by `LLM` and DisaggregatedEngine, like data_parallel_size.
      enable_expert_parallel: split a mixture-of-experts model's experts, whole, over the
        tensor-parallel devices instead of splitting every expert's mlp width (vLLM's name);
        num_experts must be a multiple of tensor_parallel_size (models/moe.py).
      quantization: weight-only quantization of the decoder projections at start (vLLM's
        name): None, "int8" (per channel), "int4" (grouped, with offsets) or "fp8" (e4m3, per
        channel), see jaxinfer/quantization.py for what stays in the model's dtype;
        "w8a8_int8" / "w8a8_fp8" (SGLang's names): per-channel 8-bit weights with the
        activations quantized per token, so the products run on 8-bit tensor cores; or "gguf":
        a GGUF file's decoder projections run in their own quantized blocks (Q8_0, Q4_0, Q4_1,
        Q4_K, Q6_K; loading/gguf_blocks.py), which `LLM` and the CLI load so; "awq" / "gptq":
        such a checkpoint (which loads 4-bit whether or not this is set; loading/awq_gptq.py).
      quantization_group_size: rows per int4 scale group (128: AWQ's and GPTQ's default).
      response_cache_size: finished responses of deterministic requests (greedy, or sampled with
        a seed the user gave) kept to answer exact repeats without running the model
        (engine/response_cache.py); 0: off.
      speculative_config: speculative decoding (vLLM's dict, e.g. {"method": "ngram",
        "num_speculative_tokens": 4, "prompt_lookup_max": 4}; see engine/speculative.py), or None.
    """

    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    page_size: int = 16
    num_pages: int | None = None
    kv_cache_memory_fraction: float = 0.85
    kv_cache_dtype: str = "auto"
    scheduling_policy: str = "fcfs"
    enable_prefix_caching: bool = True
    kv_offloading_size: float | None = None
    attention_backend: str = "auto"
    linear_kernel: str = "auto"
    scan_layers: bool | None = None
    scan_unroll: int = 1
    async_scheduling: bool | None = None
    seed: int = 0
    compilation_cache_dir: str = dataclasses.field(default_factory=default_compilation_cache_dir)
    warmup: bool = True
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    disaggregate_prefill: bool = False
    enable_expert_parallel: bool = False
    quantization: str | None = None
    quantization_group_size: int = 128
    speculative_config: Any = None  # SpeculativeConfig, or its dict form
    response_cache_size: int = 0

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "tensor_parallel_size",
                     "data_parallel_size", "scan_unroll"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 2):
            raise ValueError(f"num_pages must be an integer >= 2 (page 0 is scratch), got {self.num_pages!r}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {self.quantization!r}")
        if (not isinstance(self.quantization_group_size, int) or self.quantization_group_size < 2
                or self.quantization_group_size % 2):
            raise ValueError(f"quantization_group_size must be an even integer >= 2, got "
                             f"{self.quantization_group_size!r}")
        if self.kv_offloading_size is not None:
            size = self.kv_offloading_size
            if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0:
                raise ValueError(f"kv_offloading_size must be a positive number of GiB, got {size!r}")
            if not self.enable_prefix_caching:
                raise ValueError("kv_offloading_size keeps prefix-cache pages in host memory: it needs "
                                 "enable_prefix_caching=True")
        size = self.response_cache_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"response_cache_size must be a non-negative integer, got {size!r}")
        if self.quantization is not None and self.tensor_parallel_size > 1:
            raise ValueError(f"quantization={self.quantization!r} with tensor_parallel_size > 1 is not supported yet: "
                             "the sharding rules do not cover quantized weights")
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {LINEAR_KERNELS}, got {self.linear_kernel!r}")
        from jaxinfer.engine.speculative import SpeculativeConfig

        object.__setattr__(self, "speculative_config", SpeculativeConfig.from_dict(self.speculative_config))
