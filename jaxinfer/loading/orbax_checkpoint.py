"""Orbax checkpoints of a model: what `jaxinfer convert` writes and `--model DIR` restores.

A directory holds:
  * `params/`: the parameters as an Orbax checkpoint (StandardCheckpointer, OCDBT), in the
    module state's structure (`nnx.to_pure_dict`);
  * the tokenizer's files (tokenizer.json, tokenizer_config.json, generation_config.json),
    which `Tokenizer.from_directory` reads back, whatever the source format was;
  * MARKER: the ModelConfig as JSON, written last, so that an interrupted conversion is not
    taken for a checkpoint.

Restoring asks Orbax for every array with its target sharding (a NamedSharding on a mesh, by
the rules table), so each device reads only its own shard from disk and a model that fits only
split over several devices never lands whole on one: the point of converting once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.errors import CheckpointError

MARKER = "jaxinfer_model.json"
PARAMS = "params"
FORMAT = "jaxinfer-orbax"
VERSION = 1


def config_to_json(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_json(data: dict) -> ModelConfig:
    """The ModelConfig of `config_to_json`'s dict (lists back to tuples, rope scaling rebuilt)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise CheckpointError(f"the model config names unknown fields {unknown}; it was written by a newer jaxinfer")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    values["rope_scaling"] = RopeScaling(**values.get("rope_scaling", {}))
    return ModelConfig(**values)


def save_orbax(model, output) -> Path:
    """Writes a LoadedModel as an Orbax checkpoint directory (see the module docstring).

    Args:
      model: the loaded model (float parameters; a quantized model is quantized again at load
        with --quantization instead).
      output: a new or empty directory.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    from jaxinfer.models import param_dtype
    from jaxinfer.quantization import quantization_method

    output = Path(output).absolute()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CheckpointError(f"{output} exists and is not an empty directory; give a new one")
    held = quantization_method(model.params)
    if held is not None:
        raise CheckpointError(f"the model's projections are quantized ({held}); convert writes float parameters "
                              "(quantize when loading the checkpoint, with --quantization)")
    output.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(output / PARAMS, nnx.to_pure_dict(model.params))
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        if model.tokenizer is not None:
            model.tokenizer.save(output)
        meta = {"format": FORMAT, "version": VERSION, "dtype": param_dtype(model.params).name,
                "model_config": config_to_json(model.config)}
        (output / MARKER).write_text(json.dumps(meta, indent=1))
    return output


def read_marker(path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / MARKER} cannot be read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model_config" not in meta:
        raise CheckpointError(f"{path / MARKER} is not a jaxinfer checkpoint marker")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')!r}; this jaxinfer reads "
                              f"version {VERSION}")
    return meta


def load_orbax(path, dtype, sharding=None, *, load_tokenizer: bool = True):
    """Restores a checkpoint directory as a LoadedModel.

    Args:
      path: the directory `save_orbax` wrote.
      dtype: the parameters' dtype (Orbax casts while reading when the stored one differs).
      sharding: as `load_model`'s: None (this process's first device), a Mesh, or shardings in
        the state's structure.
      load_tokenizer: also load the tokenizer.
    """
    import orbax.checkpoint as ocp
    from flax import nnx
    from jax.sharding import SingleDeviceSharding

    from jaxinfer.loading.loader import LoadedModel
    from jaxinfer.loading.placement import keyed, shardings_for
    from jaxinfer.models import abstract_model

    path = Path(path).absolute()
    config = config_from_json(read_marker(path)["model_config"])
    _, abstract = abstract_model(config, dtype)
    targets = keyed(shardings_for(config, sharding) or {})
    default = SingleDeviceSharding(jax.local_devices()[0])

    def target(key_path, shaped):
        where = targets.get(jax.tree_util.keystr(key_path), default)
        return jax.ShapeDtypeStruct(shaped.shape, shaped.dtype, sharding=where)

    wanted = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(abstract))
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(path / PARAMS, wanted)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{path / PARAMS} does not match the model config of {path / MARKER}: {e}") from None
    finally:
        checkpointer.close()
    tokenizer = None
    if load_tokenizer and (path / "tokenizer.json").is_file():
        from jaxinfer.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_directory(path)
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=path)
