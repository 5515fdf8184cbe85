"""Where dense families' HF checkpoints name or lay out tensors differently from Llama's.

`params_from_hf` reads Llama's names; this module bridges the rest:
  * Phi-3 / Phi-4 store q|k|v as one `self_attn.qkv_proj` ([q rows; k rows; v rows]) and
    gate|up as one `mlp.gate_up_proj` ([gate rows; up rows]); `unfused_view` serves them
    under Llama's per-projection names (the module fuses them again in its own layout, grouped
    by kv head), and `fuse_phi3` is the inverse for export.
  * Gemma 2/3 have four norms per layer (`layer_norm_names`): HF's post_attention_layernorm
    normalizes the attention output there, not the MLP input as in Llama.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxinfer.config import ModelConfig

GetTensor = Callable[[str], np.ndarray]


def layer_norm_names(c: ModelConfig) -> dict[str, str]:
    """{layer parameter: HF name after `model.layers.{i}.`} of each layer's norms."""
    if c.post_norms:
        return {"attn_norm": "input_layernorm.weight", "post_attn_norm": "post_attention_layernorm.weight",
                "mlp_norm": "pre_feedforward_layernorm.weight", "post_mlp_norm": "post_feedforward_layernorm.weight"}
    return {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"}


def _phi3_parts(c: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """{Llama suffix: (fused Phi-3 suffix, first row, stop row)}."""
    q, kv, f = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    return {"self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0, q),
            "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", q, q + kv),
            "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", q + kv, q + 2 * kv),
            "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0, f),
            "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", f, 2 * f)}


def _split_name(name: str) -> tuple[str, str] | None:
    """("model.layers.{i}.", suffix) of a layer tensor name, else None."""
    if not name.startswith("model.layers."):
        return None
    i, _, suffix = name[len("model.layers."):].partition(".")
    return f"model.layers.{i}.", suffix


def unfused_view(c: ModelConfig, get: GetTensor, names: set[str]) -> tuple[GetTensor, set[str]]:
    """(get, names) of the checkpoint with Phi-3's fused projections served as Llama's separate
    ones; other families' unchanged."""
    if c.model_type != "phi3":
        return get, names
    parts = _phi3_parts(c)
    fused_suffixes = {fused for fused, _, _ in parts.values()}
    view = set(names)
    for name in names:
        split = _split_name(name)
        if split and split[1] in fused_suffixes:
            view.discard(name)
            view.update(split[0] + llama for llama, (fused, _, _) in parts.items() if fused == split[1])
    last: dict[str, np.ndarray] = {}  # the fused tensor last read: q, k, v come from one read

    def get_view(name: str) -> np.ndarray:
        split = _split_name(name)
        if not split or split[1] not in parts:
            return get(name)
        fused, start, stop = parts[split[1]]
        fused_name = split[0] + fused
        if fused_name not in last:
            last.clear()
            last[fused_name] = np.asarray(get(fused_name))
        return last[fused_name][start:stop]

    return get_view, view


def fuse_phi3(c: ModelConfig, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Llama-named state dict in Phi-3's fused names (the inverse of `unfused_view`)."""
    out = dict(state_dict)
    parts = _phi3_parts(c)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        for fused in ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"):
            pieces = sorted((start, p + llama) for llama, (f, start, _) in parts.items() if f == fused)
            out[p + fused] = np.concatenate([out.pop(name) for _, name in pieces], axis=0)
    return out
