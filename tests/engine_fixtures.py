"""A tiny random model wrapped as a LoadedModel, for engine tests that need no checkpoint."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxinfer.config import preset
from jaxinfer.loading.loader import LoadedModel
from jaxinfer.models import llama


def tiny_model(seed: int = 0, **overrides) -> LoadedModel:
    config = preset("tiny", eos_token_ids=(2,), **overrides)
    params = llama.init_params(config, jax.random.PRNGKey(seed))
    # Larger weights make next-token distributions peaked, so greedy runs are decided by clear
    # margins and batched and one-at-a-time runs can be compared token for token.
    params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)
    return LoadedModel(config=config, params=params, tokenizer=None, path=Path("."))
