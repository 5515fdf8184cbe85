"""EAGLE draft heads in the published checkpoint layout, read and written.

A head directory holds `config.json` (a Llama config of one hidden layer, the target's hidden
size and heads) and safetensors with the EAGLE names:

    fc.weight [D, 2D], fc.bias [D] (optional)        the mix of [embedding, feature]
    layers.0.self_attn.{q,k,v,o}_proj.weight         torch Linear layout, [out, in]
    layers.0.mlp.{gate,up,down}_proj.weight
    layers.0.post_attention_layernorm.weight
    (layers.0.input_layernorm.weight and embed_tokens.weight may be present; both are unused:
    the layer has no input norm, and the embedding is the target's)

A "model." prefix on every name is accepted. The layer's tensors go through the same mapping as
a model's (hf_weights.params_from_hf), as a one-layer model with a one-token vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.config import ModelConfig, read_hf_config
from jaxinfer.errors import CheckpointError
from jaxinfer.loading.hf_weights import hf_state_dict, params_from_hf
from jaxinfer.loading.safetensors import SafetensorsCheckpoint, write_safetensors
from jaxinfer.models.eagle import EagleHead, head_config

_HEAD_ARCHITECTURE = "EagleLlamaForCausalLM"


def _stub_config(config: ModelConfig) -> ModelConfig:
    """The head's layer as a one-layer model whose embedding is one row (never used)."""
    return dataclasses.replace(config, vocab_size=1, tie_word_embeddings=True)


def load_eagle_head(path: str | os.PathLike, target: ModelConfig, dtype=jnp.float32
                    ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, state) of the head in `path`, checked against the target's shape."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json; an EAGLE head is a directory with config.json "
                              "and safetensors")
    hf = read_hf_config(directory / "config.json")
    checkpoint = SafetensorsCheckpoint(directory)
    names = checkpoint.names()
    prefix = "model." if "model.fc.weight" in names else ""
    if prefix + "fc.weight" not in names:
        raise CheckpointError(f"{directory} holds no 'fc.weight': not an EAGLE head (EAGLE-3 heads, with a "
                              "'midlayer', are not supported yet)")
    for key, mine in (("hidden_size", target.hidden_size), ("num_attention_heads", target.num_heads)):
        if key in hf and int(hf[key]) != mine:
            raise CheckpointError(f"the EAGLE head's {key} is {hf[key]}, the target's {mine}: it was trained "
                                  "for another model")
    if int(hf.get("num_key_value_heads", target.num_kv_heads)) != target.num_kv_heads:
        raise CheckpointError("the EAGLE head's num_key_value_heads differs from the target's")
    config = head_config(target, intermediate_size=int(hf.get("intermediate_size", target.intermediate_size)))
    d = config.hidden_size

    def get(name: str) -> np.ndarray:
        if name == "model.embed_tokens.weight":
            return np.zeros((1, d), np.float32)
        if name in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
            return np.ones((d,), np.float32)  # no input norm, no final norm (see module docstring)
        return checkpoint.get(prefix + name[len("model."):])

    layer_names = {"model." + n[len(prefix):] for n in names if n[len(prefix):].startswith("layers.0.")}
    layer_names |= {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"}
    tree = params_from_hf(_stub_config(config), get, layer_names, dtype)
    fc = np.asarray(checkpoint.get(prefix + "fc.weight"), np.float32)
    if fc.shape != (d, 2 * d):
        raise CheckpointError(f"fc.weight has shape {fc.shape}, expected {(d, 2 * d)}")
    fc_bias = prefix + "fc.bias" in names
    head = nnx.eval_shape(lambda: EagleHead(config, fc_bias=fc_bias, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(head)

    def cast(x):
        return jnp.asarray(np.asarray(x, np.float32), dtype)

    pure = {"fc": cast(fc.T), "layers": {k: cast(v) for k, v in tree["layers"].items()}}
    if fc_bias:
        pure["fc_bias"] = cast(np.asarray(checkpoint.get(prefix + "fc.bias"), np.float32))
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


def save_eagle_head(directory: str | os.PathLike, head_state: nnx.State, config: ModelConfig) -> Path:
    """Writes the head in the published layout (float32 safetensors and a Llama config.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pure = nnx.to_pure_dict(head_state)
    stub = _stub_config(config)
    layer = hf_state_dict(stub, {"embed": np.zeros((1, config.hidden_size)), "final_norm": np.ones(config.hidden_size),
                                 "layers": pure["layers"]})
    tensors = {name[len("model."):]: v for name, v in layer.items()
               if name.startswith("model.layers.0.") and not name.endswith("input_layernorm.weight")}
    tensors["fc.weight"] = np.ascontiguousarray(np.asarray(pure["fc"], np.float32).T)
    if pure.get("fc_bias") is not None:
        tensors["fc.bias"] = np.asarray(pure["fc_bias"], np.float32)
    write_safetensors(directory / "model.safetensors", tensors)
    hf = {"architectures": [_HEAD_ARCHITECTURE], "model_type": "llama", "hidden_size": config.hidden_size,
          "intermediate_size": config.intermediate_size, "num_hidden_layers": 1,
          "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
          "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
          "vocab_size": config.vocab_size, "max_position_embeddings": config.max_position_embeddings,
          "hidden_act": "silu", "bias": pure.get("fc_bias") is not None}
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    return directory
