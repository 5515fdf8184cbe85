"""A tiny random model wrapped as a LoadedModel, for engine tests that need no checkpoint."""

from __future__ import annotations

from pathlib import Path

import jax

from flax import nnx

from jaxinfer.config import preset
from jaxinfer.loading.loader import LoadedModel
from jaxinfer.models import create_model


def peaked(state):
    """Weights times 4 (norms unchanged): next-token distributions get peaked, so greedy runs are
    decided by clear margins and batched and one-at-a-time runs compare token for token."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 4, state)


def tiny_model(seed: int = 0, name: str = "tiny", **overrides) -> LoadedModel:
    """A random model of the preset `name` ("tiny", or "tiny-moe": routed experts)."""
    config = preset(name, eos_token_ids=(2,), **overrides)
    graphdef, state = nnx.split(create_model(config, seed=seed))
    return LoadedModel(config=config, params=peaked(state), tokenizer=None, path=Path("."), graphdef=graphdef)
