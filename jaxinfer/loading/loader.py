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
    """A model ready for the engine: its config, its state (parameters, on the device) and the
    graph definition the state merges into (see jaxinfer/models/__init__.py).

    `params` may also be given as a nested dict of arrays in the state's structure; it is
    turned into the module's state here. `graphdef` defaults to the config's model class.
    """

    config: ModelConfig
    params: Any  # nnx.State of the model (see jaxinfer/models/llama.py)
    tokenizer: Any | None  # jaxinfer.tokenizer.Tokenizer, or None when the checkpoint has none
    path: Path
    graphdef: Any = None

    def __post_init__(self):
        from flax import nnx

        from jaxinfer.models import abstract_model, state_from_tree

        if not isinstance(self.params, nnx.State):
            self.graphdef, self.params = state_from_tree(self.config, self.params)
        elif self.graphdef is None:
            self.graphdef, _ = abstract_model(self.config)

    @classmethod
    def from_module(cls, module, tokenizer=None, path: str | os.PathLike = ".") -> "LoadedModel":
        """Wraps a Flax NNX model built or fine-tuned in JAX (a supported family's module)."""
        from flax import nnx

        config = getattr(module, "config", None)
        if not isinstance(config, ModelConfig):
            raise ValueError(f"{type(module).__name__} carries no jaxinfer ModelConfig as `.config`; build it "
                             "from a supported family's module (jaxinfer.models)")
        graphdef, state = nnx.split(module)
        return cls(config=config, params=state, tokenizer=tokenizer, path=Path(path), graphdef=graphdef)


def load_hf_directory(directory: str | os.PathLike, dtype=jnp.float32):
    """(config, host params) from an HF directory with config.json and safetensors."""
    from jaxinfer.config import read_hf_config
    from jaxinfer.loading.awq_gptq import packed_layer_weights, quantization_of
    from jaxinfer.loading.hf_weights import params_from_hf
    from jaxinfer.loading.safetensors import SafetensorsCheckpoint

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; expected an HF model directory")
    hf_config = read_hf_config(config_path)
    config = ModelConfig.from_hf_config(hf_config)
    checkpoint = SafetensorsCheckpoint(directory)
    quantized = {}
    quantization = quantization_of(hf_config)
    if quantization is not None and config.is_moe:
        raise CheckpointError(f"quantized ({quantization['quant_method']}) mixture-of-experts checkpoints are "
                              "not supported: the experts run in a grouped matmul of float weights")
    if quantization is not None and quantization["quant_method"] == "compressed-tensors":
        from jaxinfer.loading.fp8_weights import fp8_layer_weights

        quantized = fp8_layer_weights(config, checkpoint.get)  # projections stay fp8
    elif quantization is not None:  # AWQ / GPTQ: the projections stay 4-bit
        quantized = packed_layer_weights(config, checkpoint.get, checkpoint.names(), quantization)
    params = params_from_hf(config, checkpoint.get, checkpoint.names(), dtype, skip=set(quantized))
    params["layers"].update(quantized)
    return config, params


def _load_tokenizer(path: Path):
    from jaxinfer.tokenizer import Tokenizer

    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_directory(path)
    return None


def load_tokenizer(ref: str | None = None):
    """The tokenizer of `ref` alone (no weights, no device): for a front end whose engine runs
    in another process. None when the checkpoint has none."""
    from jaxinfer.loading.resolve import resolve_model

    resolved = resolve_model(ref)
    path = Path(resolved.path)
    if resolved.kind == "gguf":
        from jaxinfer.loading.gguf import GGUFCheckpoint
        from jaxinfer.tokenizer import Tokenizer

        return Tokenizer.from_gguf(GGUFCheckpoint(path).reader)
    return _load_tokenizer(path)


def load_model(ref: str | None = None, dtype=None, *, load_tokenizer: bool = True,
               sharding=None, gguf_blocks: bool = False) -> LoadedModel:
    """Resolves `ref` (directory, .gguf file, alias or hub id) and loads it.

    Args:
      ref: the model reference; None means the default demo model.
      dtype: parameter dtype; default bfloat16 on accelerators and float32 on the CPU.
      load_tokenizer: also load the tokenizer (and chat template).
      sharding: where the parameters go: None (the default device), a Mesh (split by the rules
        table, sharding/rules.py), or shardings in the state's structure (an nnx.State such as
        `param_shardings` gives, or a nested dict). Each tensor goes straight into its shards
        as it is placed (loading/placement.py); an Orbax checkpoint is restored so, each
        device reading only its shard (loading/orbax_checkpoint.py).
      gguf_blocks: a GGUF file's decoder projections stay in their quantized blocks
        (loading/gguf_blocks.py) instead of being dequantized to `dtype`.
    """
    from jaxinfer.loading.placement import place_params, shardings_for
    from jaxinfer.loading.resolve import resolve_model

    if dtype is None:
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    resolved = resolve_model(ref)
    path = Path(resolved.path)
    tokenizer = None
    if resolved.kind == "orbax":
        from jaxinfer.loading.orbax_checkpoint import load_orbax

        return load_orbax(path, dtype, sharding, load_tokenizer=load_tokenizer)
    if resolved.kind == "gguf":
        from jaxinfer.loading.gguf import GGUFCheckpoint, load_gguf
        from jaxinfer.tokenizer import Tokenizer

        checkpoint = GGUFCheckpoint(path)  # parsing the metadata takes seconds: once for both
        config, host_params = load_gguf(checkpoint, dtype=dtype, keep_blocks=gguf_blocks)
        if load_tokenizer:
            tokenizer = Tokenizer.from_gguf(checkpoint.reader)
    else:
        config, host_params = load_hf_directory(path, dtype)
        if load_tokenizer:
            tokenizer = _load_tokenizer(path)
    params = place_params(host_params, shardings_for(config, sharding))
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=path)
