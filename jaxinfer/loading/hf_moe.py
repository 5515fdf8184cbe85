"""HF tensor names of the mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE), stacked into
models/moe.py's [L, X, ...] expert arrays at load, and back for export.

Mixtral keeps its MLP under `block_sparse_moe` with experts' w1 (gate), w3 (up), w2 (down);
the Qwen MoE families under `mlp` with gate_proj / up_proj / down_proj, plus Qwen2-MoE's
`shared_expert` and `shared_expert_gate`. Torch Linear weights are [out, in].
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxinfer.config import ModelConfig

Load = Callable[[str, tuple[int, ...]], np.ndarray]


def moe_layer_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer shape of each stacked MoE parameter present in this config."""
    d, x, f, s = c.hidden_size, c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
    shapes = {"w_router": (d, x), "w_expert_gate_up": (x, d, 2, f), "w_expert_down": (x, f, d)}
    if s:
        shapes.update(w_shared_gate_up=(d, 2, s), w_shared_down=(s, d), w_shared_gate=(d, 1))
    return shapes


def _names(c: ModelConfig, layer_prefix: str) -> tuple[str, str, tuple[str, str, str]]:
    """(MLP prefix, router name, expert (gate, up, down) suffixes) of a layer."""
    if c.model_type == "mixtral":
        return layer_prefix + "block_sparse_moe.", "gate", ("w1", "w3", "w2")
    return layer_prefix + "mlp.", "gate", ("gate_proj", "up_proj", "down_proj")


def load_moe_layer(c: ModelConfig, layer_prefix: str, i: int, layers: dict[str, np.ndarray], load: Load):
    """Fills layer i of the stacked MoE arrays in `layers` from the checkpoint."""
    d, f, s = c.hidden_size, c.moe_intermediate_size, c.shared_expert_intermediate_size
    mlp, router, (gate, up, down) = _names(c, layer_prefix)
    layers["w_router"][i] = load(mlp + router + ".weight", (c.num_experts, d)).T
    for e in range(c.num_experts):
        p = f"{mlp}experts.{e}."
        layers["w_expert_gate_up"][i, e, :, 0] = load(p + gate + ".weight", (f, d)).T
        layers["w_expert_gate_up"][i, e, :, 1] = load(p + up + ".weight", (f, d)).T
        layers["w_expert_down"][i, e] = load(p + down + ".weight", (d, f)).T
    if s:
        layers["w_shared_gate_up"][i, :, 0] = load(mlp + "shared_expert.gate_proj.weight", (s, d)).T
        layers["w_shared_gate_up"][i, :, 1] = load(mlp + "shared_expert.up_proj.weight", (s, d)).T
        layers["w_shared_down"][i] = load(mlp + "shared_expert.down_proj.weight", (d, s)).T
        layers["w_shared_gate"][i] = load(mlp + "shared_expert_gate.weight", (1, d)).T


def moe_layer_state_dict(c: ModelConfig, layer_prefix: str, i: int, layers: dict[str, np.ndarray]) -> dict:
    """HF-named tensors of layer i's MoE MLP: the inverse of `load_moe_layer`."""
    mlp, router, (gate, up, down) = _names(c, layer_prefix)
    out = {mlp + router + ".weight": layers["w_router"][i].T}
    for e in range(c.num_experts):
        p = f"{mlp}experts.{e}."
        out[p + gate + ".weight"] = layers["w_expert_gate_up"][i, e, :, 0].T
        out[p + up + ".weight"] = layers["w_expert_gate_up"][i, e, :, 1].T
        out[p + down + ".weight"] = layers["w_expert_down"][i, e].T
    if c.shared_expert_intermediate_size:
        out[mlp + "shared_expert.gate_proj.weight"] = layers["w_shared_gate_up"][i][:, 0].T
        out[mlp + "shared_expert.up_proj.weight"] = layers["w_shared_gate_up"][i][:, 1].T
        out[mlp + "shared_expert.down_proj.weight"] = layers["w_shared_down"][i].T
        out[mlp + "shared_expert_gate.weight"] = layers["w_shared_gate"][i].T
    return out
