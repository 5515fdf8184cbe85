"""Maps HF transformers tensor names and layouts onto the parameter tree of `models/llama.py`.

Every format loader (safetensors, GGUF) ends here: it provides a `get(name)` that returns the
HF-named tensor as a numpy array in HF's layout (torch `Linear` weights are [out, in]), and
`params_from_hf` reshapes each into the axis-lettered layout.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError
from jaxinfer.models.llama import Params

GetTensor = Callable[[str], np.ndarray]


def _np_dtype(dtype) -> np.dtype:
    if jnp.dtype(dtype) == jnp.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(jnp.dtype(dtype).name)


def _expect(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array


def params_from_hf(config: ModelConfig, get: GetTensor, names: set[str], dtype=jnp.float32) -> Params:
    """Builds the parameter tree from HF-named tensors.

    Args:
      config: the model configuration.
      get: returns the HF-layout numpy array for a tensor name.
      names: every tensor name the checkpoint holds (to tell tied heads and spot omissions).
      dtype: target dtype of the parameters.
    Returns:
      The parameter tree as host numpy arrays of `dtype` (device placement is the caller's).
    """
    d, n, k, h, f, v = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                        config.intermediate_size, config.vocab_size)
    target = _np_dtype(dtype)

    def load(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in names:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        return _expect(name, np.asarray(get(name)), shape)

    def cast(x: np.ndarray) -> np.ndarray:
        # Go through float32 so that every source dtype (f16, bf16, dequantized blocks) converts alike.
        return np.ascontiguousarray(x.astype(np.float32).astype(target))

    params: Params = {"embed_vd": cast(load("model.embed_tokens.weight", (v, d)))}
    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        lp = {
            "attn_norm_d": cast(load(p + "input_layernorm.weight", (d,))),
            "wq_dnh": cast(load(p + "self_attn.q_proj.weight", (n * h, d)).reshape(n, h, d).transpose(2, 0, 1)),
            "wk_dkh": cast(load(p + "self_attn.k_proj.weight", (k * h, d)).reshape(k, h, d).transpose(2, 0, 1)),
            "wv_dkh": cast(load(p + "self_attn.v_proj.weight", (k * h, d)).reshape(k, h, d).transpose(2, 0, 1)),
            "wo_nhd": cast(load(p + "self_attn.o_proj.weight", (d, n * h)).reshape(d, n, h).transpose(1, 2, 0)),
            "mlp_norm_d": cast(load(p + "post_attention_layernorm.weight", (d,))),
            "w_gate_df": cast(load(p + "mlp.gate_proj.weight", (f, d)).T),
            "w_up_df": cast(load(p + "mlp.up_proj.weight", (f, d)).T),
            "w_down_fd": cast(load(p + "mlp.down_proj.weight", (d, f)).T),
        }
        if config.qkv_bias:
            lp["bq_nh"] = cast(load(p + "self_attn.q_proj.bias", (n * h,)).reshape(n, h))
            lp["bk_kh"] = cast(load(p + "self_attn.k_proj.bias", (k * h,)).reshape(k, h))
            lp["bv_kh"] = cast(load(p + "self_attn.v_proj.bias", (k * h,)).reshape(k, h))
        if config.o_bias:
            lp["bo_d"] = cast(load(p + "self_attn.o_proj.bias", (d,)))
        if config.qk_norm:
            lp["q_norm_h"] = cast(load(p + "self_attn.q_norm.weight", (h,)))
            lp["k_norm_h"] = cast(load(p + "self_attn.k_norm.weight", (h,)))
        layers.append(lp)
    params["layers"] = layers
    params["final_norm_d"] = cast(load("model.norm.weight", (d,)))
    if not config.tie_word_embeddings:
        if "lm_head.weight" in names:
            params["lm_head_vd"] = cast(load("lm_head.weight", (v, d)))
        else:
            raise CheckpointError("checkpoint has no 'lm_head.weight' but tie_word_embeddings is false")
    return params
