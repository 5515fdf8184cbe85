"""Maps HF transformers tensor names and layouts onto the Llama module's state, and back.

Every format loader (safetensors, GGUF) ends here: it provides a `get(name)` that returns the
HF-named tensor as a numpy array in HF's layout (torch `Linear` weights are [out, in]), and
`params_from_hf` fuses and stacks them into the module's layout (see models/llama.py: q|k|v
grouped by kv head, gate|up side by side, every layer stacked on a leading axis).
`hf_state_dict` is the inverse, for exporting a model built or fine-tuned in JAX.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError
from jaxinfer.loading.hf_moe import load_moe_layer, moe_layer_shapes, moe_layer_state_dict
from jaxinfer.loading.hf_variants import fuse_phi3, layer_norm_names, unfused_view

GetTensor = Callable[[str], np.ndarray]
Tree = dict[str, Any]


def _np_dtype(dtype) -> np.dtype:
    if jnp.dtype(dtype) == jnp.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(jnp.dtype(dtype).name)


def _expect(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array


def _layer_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer shape of each stacked parameter present in this config."""
    d, k, h, f, e = c.hidden_size, c.num_kv_heads, c.head_dim, c.intermediate_size, c.q_per_kv + 2
    shapes = {"attn_norm": (d,), "w_qkv": (d, k, e, h), "w_o": (c.num_heads, h, d), "mlp_norm": (d,),
              "w_gate_up": (d, 2, f), "w_down": (f, d)}
    if c.qkv_bias:
        shapes["b_qkv"] = (k, e, h)
    if c.o_bias:
        shapes["b_o"] = (d,)
    if c.qk_norm:
        shapes.update(q_norm=(h,), k_norm=(h,))
    if c.post_norms:
        shapes.update(post_attn_norm=(d,), post_mlp_norm=(d,))
    if c.is_moe:  # routed experts in place of the dense MLP
        del shapes["w_gate_up"], shapes["w_down"]
        shapes.update(moe_layer_shapes(c))
    return shapes


def params_from_hf(config: ModelConfig, get: GetTensor, names: set[str], dtype=jnp.float32,
                   skip: set[str] = frozenset()) -> Tree:
    """Builds the module's state, as a nested dict of host arrays, from HF-named tensors.

    Args:
      config: the model configuration.
      get: returns the HF-layout numpy array for a tensor name.
      names: every tensor name the checkpoint holds (to tell tied heads and spot omissions).
      dtype: target dtype of the parameters.
      skip: layer parameters ("w_qkv", "w_o", "w_gate_up", "w_down") the caller fills itself.
    Returns:
      {"embed", "layers": {...}, "final_norm", "lm_head"?} of numpy arrays of `dtype`
      (`models.state_from_tree` turns it into the module's state).
    """
    c = config
    d, n, k, h, f, v, g = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
                           c.vocab_size, c.q_per_kv)
    target = _np_dtype(dtype)
    get, names = unfused_view(c, get, names)  # Phi-3's fused projections, split

    def load(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in names:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        # Through float32 so every source dtype (f16, bf16, dequantized blocks) converts alike.
        return _expect(name, np.asarray(get(name)), shape).astype(np.float32)

    def cast(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.astype(target))

    # Stacked arrays are allocated once and filled layer by layer: peak host memory stays at
    # the model plus one layer.
    layers = {name: np.empty((c.num_layers, *shape), target) for name, shape in _layer_shapes(c).items()
              if name not in skip}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        if "w_qkv" not in skip:
            wq = load(p + "self_attn.q_proj.weight", (n * h, d)).reshape(k, g, h, d)
            wk = load(p + "self_attn.k_proj.weight", (k * h, d)).reshape(k, 1, h, d)
            wv = load(p + "self_attn.v_proj.weight", (k * h, d)).reshape(k, 1, h, d)
            layers["w_qkv"][i] = np.concatenate([wq, wk, wv], axis=1).transpose(3, 0, 1, 2)  # [D, K, E, H]
        if "w_o" not in skip:
            layers["w_o"][i] = load(p + "self_attn.o_proj.weight", (d, n * h)).reshape(d, n, h).transpose(1, 2, 0)
        if c.is_moe:
            load_moe_layer(c, p, i, layers, load)
        elif "w_gate_up" not in skip:
            layers["w_gate_up"][i, :, 0] = load(p + "mlp.gate_proj.weight", (f, d)).T
            layers["w_gate_up"][i, :, 1] = load(p + "mlp.up_proj.weight", (f, d)).T
        if "w_down" not in skip and not c.is_moe:
            layers["w_down"][i] = load(p + "mlp.down_proj.weight", (d, f)).T
        for param, hf_name in layer_norm_names(c).items():
            layers[param][i] = load(p + hf_name, (d,))
        if c.qkv_bias:
            bq = load(p + "self_attn.q_proj.bias", (n * h,)).reshape(k, g, h)
            bk = load(p + "self_attn.k_proj.bias", (k * h,)).reshape(k, 1, h)
            bv = load(p + "self_attn.v_proj.bias", (k * h,)).reshape(k, 1, h)
            layers["b_qkv"][i] = np.concatenate([bq, bk, bv], axis=1)
        if c.o_bias:
            layers["b_o"][i] = load(p + "self_attn.o_proj.bias", (d,))
        if c.qk_norm:
            layers["q_norm"][i] = load(p + "self_attn.q_norm.weight", (h,))
            layers["k_norm"][i] = load(p + "self_attn.k_norm.weight", (h,))
    tree: Tree = {"embed": cast(load("model.embed_tokens.weight", (v, d))), "layers": layers,
                  "final_norm": cast(load("model.norm.weight", (d,)))}
    if not c.tie_word_embeddings:
        if "lm_head.weight" not in names:
            raise CheckpointError("checkpoint has no 'lm_head.weight' but tie_word_embeddings is false")
        tree["lm_head"] = cast(load("lm_head.weight", (v, d)))
    return tree


def hf_state_dict(config: ModelConfig, tree: Tree) -> dict[str, np.ndarray]:
    """The HF transformers state dict (numpy, float32) of a module state given as a nested dict
    of arrays (`nnx.to_pure_dict(state)`): the inverse of `params_from_hf`."""
    c = config
    d, n, k, h, g = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.q_per_kv

    def f32(x) -> np.ndarray:
        return np.asarray(x, np.float32)

    layers = {name: f32(x) for name, x in tree["layers"].items()}
    out = {"model.embed_tokens.weight": f32(tree["embed"]), "model.norm.weight": f32(tree["final_norm"])}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = f32(tree["lm_head"])
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        qkv = layers["w_qkv"][i].transpose(1, 2, 3, 0)  # [K, E, H, D]
        out[p + "self_attn.q_proj.weight"] = qkv[:, :g].reshape(n * h, d)
        out[p + "self_attn.k_proj.weight"] = qkv[:, g].reshape(k * h, d)
        out[p + "self_attn.v_proj.weight"] = qkv[:, g + 1].reshape(k * h, d)
        out[p + "self_attn.o_proj.weight"] = layers["w_o"][i].transpose(2, 0, 1).reshape(d, n * h)
        if c.is_moe:
            out.update(moe_layer_state_dict(c, p, i, layers))
        else:
            out[p + "mlp.gate_proj.weight"] = layers["w_gate_up"][i][:, 0].T
            out[p + "mlp.up_proj.weight"] = layers["w_gate_up"][i][:, 1].T
            out[p + "mlp.down_proj.weight"] = layers["w_down"][i].T
        for param, hf_name in layer_norm_names(c).items():
            out[p + hf_name] = layers[param][i]
        if c.qkv_bias:
            b = layers["b_qkv"][i]
            out[p + "self_attn.q_proj.bias"] = b[:, :g].reshape(n * h)
            out[p + "self_attn.k_proj.bias"] = b[:, g].reshape(k * h)
            out[p + "self_attn.v_proj.bias"] = b[:, g + 1].reshape(k * h)
        if c.o_bias:
            out[p + "self_attn.o_proj.bias"] = layers["b_o"][i]
        if c.qk_norm:
            out[p + "self_attn.q_norm.weight"] = layers["q_norm"][i]
            out[p + "self_attn.k_norm.weight"] = layers["k_norm"][i]
    if c.model_type == "phi3":
        out = fuse_phi3(c, out)
    return {name: np.ascontiguousarray(x) for name, x in out.items()}
