"""The offline API, with vLLM's names: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine, PromptType
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    """An engine over one model, for batch generation in a script or notebook.

    Args:
      model: HF directory, .gguf file, hub id, alias (None: the demo model), a LoadedModel, or a
        Flax NNX model of a supported family built or fine-tuned in JAX (`jaxinfer.models`;
        pass its `tokenizer` to generate from text).
      dtype: "float32", "bfloat16" or "auto" (bfloat16 on accelerators, float32 on the CPU).
      gpu_memory_utilization: share of free device memory for the KV cache (vLLM's name for
        `kv_cache_memory_fraction`).
      **engine_kwargs: any EngineConfig field (max_model_len, max_num_seqs,
        max_num_batched_tokens, page_size, num_pages, enable_prefix_caching, seed,
        attention_backend, tensor_parallel_size, data_parallel_size, quantization ("int8",
        "int4", "fp8", or "gguf" to run a GGUF file's own blocks), ...). With
        data_parallel_size > 1, `llm.engine` is a DataParallelEngine of that many replicas
        (jaxinfer/engine/data_parallel.py); with disaggregate_prefill=True, a
        DisaggregatedEngine (prefill and decode on their own devices,
        jaxinfer/engine/disaggregated.py).
    The functional model is reachable as `llm.model.config`, `llm.model.graphdef` and
    `llm.model.params` (the NNX state; `nnx.merge(graphdef, params)` rebuilds the module).
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", gpu_memory_utilization: float | None = None,
                 tokenizer=None, **engine_kwargs):
        import jax.numpy as jnp

        from jaxinfer.loading.loader import LoadedModel, load_model

        unknown = set(engine_kwargs) - _ENGINE_FIELDS
        if unknown:
            raise TypeError(f"unknown LLM arguments {sorted(unknown)}; engine options are {sorted(_ENGINE_FIELDS)}")
        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
        if gpu_memory_utilization is not None:
            engine_kwargs["kv_cache_memory_fraction"] = gpu_memory_utilization
        config = EngineConfig(**engine_kwargs)
        from flax import nnx

        from jaxinfer.engine.data_parallel import DataParallelEngine, replica_devices
        from jaxinfer.engine.disaggregated import DisaggregatedEngine, disaggregated_devices
        from jaxinfer.sharding import make_mesh

        # Checked before loading: too few devices is an error before minutes of reading weights.
        groups = replica_devices(config)
        if config.disaggregate_prefill:
            groups = disaggregated_devices(config)
        if isinstance(model, LoadedModel):
            self.model = model
        elif isinstance(model, nnx.Module):
            self.model = LoadedModel.from_module(model)
        else:
            # Split models load straight into (the first) replica's shards.
            tp = config.tensor_parallel_size
            self.model = load_model(model, dtype=None if dtype == "auto" else getattr(jnp, dtype),
                                    gguf_blocks=config.quantization == "gguf",
                                    sharding=make_mesh(tp=tp, devices=groups[0]) if tp > 1 else None)
        if tokenizer is not None:
            self.model.tokenizer = tokenizer
        if config.disaggregate_prefill:
            self.engine = DisaggregatedEngine(self.model, config, prefill_devices=groups[0],
                                              decode_devices=groups[1])
        elif config.data_parallel_size > 1:
            self.engine = DataParallelEngine(self.model, config, devices=[d for g in groups for d in g])
        else:
            self.engine = LLMEngine(self.model, config)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.model.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generates completions for every prompt; outputs come back in prompt order.

        A prompt is a string, a list of token ids, or {"prompt_token_ids": [...]}. Invalid
        prompts or parameters raise ValueError before anything is queued.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, Sequence) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        priority = list(priority) if priority is not None else [0] * len(prompts)
        return self._run([(p, sp, pr) for p, sp, pr in zip(prompts, sampling_params, priority)], use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, **template_kwargs) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them, then generates."""
        tok = self.model.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this model has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, **template_kwargs)
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, items, use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        ids = []
        prepare = getattr(self.engine, "prepare_structured_outputs", None)
        if prepare is not None:  # a batch's new grammars compile in parallel, not one by one
            prepare([params for _, params, _ in items])
        try:
            for prompt, params, prio in items:
                rid = f"offline-{next(self._counter)}"
                if isinstance(params, SamplingParams) and params.output_kind != RequestOutputKind.FINAL_ONLY:
                    # Only final outputs are returned, so none is built while a request runs.
                    params = params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
                self.engine.add_request(rid, prompt, params, priority=prio)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)  # all or nothing: a bad prompt queues none of the batch
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", disable=not use_tqdm, unit="req") as bar:
            while len(finished) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[rid] for rid in ids]
