"""One entry point from a model reference to (config, parameters on the device, tokenizer)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: Any  # the parameter tree (see jaxinfer/models/llama.py)
    tokenizer: Any | None  # jaxinfer.tokenizer.Tokenizer, or None when the checkpoint has none
    path: Path


def load_hf_directory(directory: str | os.PathLike, dtype=jnp.float32):
    """(config, host params) from an HF directory with config.json and safetensors."""
    from jaxinfer.loading.hf_weights import params_from_hf
    from jaxinfer.loading.safetensors import SafetensorsCheckpoint

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; expected an HF model directory")
    config = ModelConfig.from_json_file(config_path)
    checkpoint = SafetensorsCheckpoint(directory)
    return config, params_from_hf(config, checkpoint.get, checkpoint.names(), dtype)


def _load_tokenizer(path: Path):
    from jaxinfer.tokenizer import Tokenizer

    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_directory(path)
    return None


def load_model(ref: str | None = None, dtype=None, *, load_tokenizer: bool = True,
               sharding=None) -> LoadedModel:
    """Resolves `ref` (directory, .gguf file, alias or hub id) and loads it.

    Args:
      ref: the model reference; None means the default demo model.
      dtype: parameter dtype; default bfloat16 on accelerators and float32 on the CPU.
      load_tokenizer: also load the tokenizer (and chat template).
      sharding: optional pytree of shardings matching the parameter tree (see `sharding/`).
    """
    from jaxinfer.loading.resolve import resolve_model

    if dtype is None:
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    resolved = resolve_model(ref)
    path = Path(resolved.path)
    tokenizer = None
    if resolved.kind == "gguf":
        from jaxinfer.loading.gguf import GGUFCheckpoint, load_gguf
        from jaxinfer.tokenizer import Tokenizer

        checkpoint = GGUFCheckpoint(path)  # parsing the metadata takes seconds: once for both
        config, host_params = load_gguf(checkpoint, dtype=dtype)
        if load_tokenizer:
            tokenizer = Tokenizer.from_gguf(checkpoint.reader)
    else:
        config, host_params = load_hf_directory(path, dtype)
        if load_tokenizer:
            tokenizer = _load_tokenizer(path)
    params = jax.device_put(host_params, sharding) if sharding is not None else jax.device_put(host_params)
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=path)
