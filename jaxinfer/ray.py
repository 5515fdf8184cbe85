"""Ray Data over many hosts: `LLMPredictor`, a callable class for `Dataset.map_batches` that holds
one engine replica per Ray actor, so a dataset spreads over as many replicas (GPUs, TPU hosts,
whole machines) as the cluster gives actors.

    import ray
    from jaxinfer import SamplingParams
    from jaxinfer.ray import LLMPredictor

    ds = ray.data.read_json("prompts.jsonl")                   # rows with a "prompt" field
    ds = ds.map_batches(LLMPredictor, concurrency=4, num_gpus=1, batch_size=64,
                        fn_constructor_kwargs={"model": "/models/llama-3-8b", "max_num_seqs": 64,
                                               "sampling_params": SamplingParams(max_tokens=128)})
    ds.write_json("out/")

Nothing here imports ray (Ray instantiates the class in each actor), so `pip install
"jaxinfer[ray]"` is needed only where the pipeline is driven. docs/batch.md has the whole recipe.
"""

from __future__ import annotations

from typing import Any

import numpy as np

OUTPUT_COLUMNS = ("generated_text", "generated_tokens", "num_input_tokens", "num_generated_tokens",
                  "finish_reason")


class LLMPredictor:
    """One engine over one model, turning batches of prompts into completions.

    Args:
      model: what `LLM` takes as its model (a path, hub id or alias loadable on the actor's host).
      sampling_params: a SamplingParams, or a dict of its fields, for every row (default:
        SamplingParams()); n must be 1, as each row gets one completion.
      dtype: as for `LLM`.
      **engine_kwargs: EngineConfig fields (max_num_seqs, max_model_len, tensor_parallel_size, ...).

    A batch (Ray's default "numpy" format) has a "prompt" column of strings or a
    "prompt_token_ids" column of integer arrays; the result is the batch's columns plus
    OUTPUT_COLUMNS (vLLM's Ray Data names): the text, its token ids, the prompt's and the
    completion's token counts, and why each completion stopped.
    """

    def __init__(self, model: Any, sampling_params=None, *, dtype: str = "auto", **engine_kwargs):
        from jaxinfer.llm import LLM
        from jaxinfer.sampling_params import SamplingParams

        if isinstance(sampling_params, dict):
            sampling_params = SamplingParams(**sampling_params)
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(self.sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams or a dict, got "
                            f"{type(self.sampling_params).__name__}")
        if self.sampling_params.n != 1:
            raise ValueError(f"LLMPredictor gives each row one completion, so n must be 1, got "
                             f"{self.sampling_params.n} (repeat the rows instead)")
        self.llm = LLM(model, dtype=dtype, **engine_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "prompt_token_ids" in batch:
            prompts = [{"prompt_token_ids": [int(t) for t in ids]} for ids in batch["prompt_token_ids"]]
        elif "prompt" in batch:
            prompts = [str(p) for p in batch["prompt"]]
        else:
            raise KeyError(f"a batch needs a 'prompt' or a 'prompt_token_ids' column; it has {sorted(batch)}")
        outputs = self.llm.generate(prompts, self.sampling_params, use_tqdm=False) if prompts else []
        completions = [out.outputs[0] for out in outputs]
        tokens = np.empty(len(completions), dtype=object)  # ragged: one int array per row
        tokens[:] = [np.asarray(c.token_ids, dtype=np.int64) for c in completions]
        return {**batch,
                "generated_text": np.array([c.text for c in completions], dtype=object),
                "generated_tokens": tokens,
                "num_input_tokens": np.array([len(out.prompt_token_ids) for out in outputs], dtype=np.int64),
                "num_generated_tokens": np.array([len(c.token_ids) for c in completions], dtype=np.int64),
                "finish_reason": np.array([c.finish_reason for c in completions], dtype=object)}
