"""Quantized checkpoints' projections (GGUF blocks, AWQ, GPTQ) joined into the model's fused,
layer-stacked weights as `QuantizedWeight`s, with no float step.

Each source gives, per HF linear module, its codes in the quantized matmul's layout ([K, N],
groups along K; pallas_kernels/quantized_matmul/layout.py). Joining happens by columns, which
the layout allows because groups run along K: q|k|v grouped by kv head and gate|up side by
side, as models/llama.py projects with.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxinfer.config import ModelConfig

# (values, scales, offsets or None, QuantLayout) of one linear module, or None when the source
# cannot give it in a native layout.
Codes = tuple


def _fused(parts: list[Codes], column_shapes, fuse) -> Codes | None:
    layouts = {p[3] for p in parts}
    if len(layouts) != 1 or len({p[2] is None for p in parts}) != 1:
        return None  # parts in different formats cannot share one weight
    out = []
    for field in range(3):
        arrays = [p[field] for p in parts]
        if arrays[0] is None:
            out.append(None)
            continue
        joined = fuse([a.reshape(a.shape[0], *cols) for a, cols in zip(arrays, column_shapes)])
        out.append(joined.reshape(joined.shape[0], -1))
    return (*out, parts[0][3])


def stack_projection_codes(config: ModelConfig, codes_for: Callable[[str], Codes | None]) -> dict:
    """{param name: QuantizedWeight [L, K, N]} for each of w_qkv, w_o, w_gate_up, w_down whose
    parts in every layer come in one layout; the others are left out (the caller loads them as
    floats). codes_for(hf module name, e.g. "model.layers.0.self_attn.q_proj") gives a
    module's codes or None."""
    import jax.numpy as jnp

    from jaxinfer.quantization import QuantizedWeight

    k, g, h = config.num_kv_heads, config.q_per_kv, config.head_dim
    plans = {
        "w_qkv": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], [(k, g, h), (k, 1, h), (k, 1, h)],
                  lambda a: np.concatenate(a, axis=2)),
        "w_o": (["self_attn.o_proj"], [(-1,)], lambda a: a[0]),
        "w_gate_up": (["mlp.gate_proj", "mlp.up_proj"], [(1, -1), (1, -1)], lambda a: np.concatenate(a, axis=1)),
        "w_down": (["mlp.down_proj"], [(-1,)], lambda a: a[0]),
    }
    out = {}
    for param, (parts, columns, fuse) in plans.items():
        layers = []
        for i in range(config.num_layers):
            codes = [codes_for(f"model.layers.{i}.{p}") for p in parts]
            fused = None if any(c is None for c in codes) else _fused(codes, columns, fuse)
            if fused is None or (layers and fused[3] != layers[0][3]):
                layers = None
                break
            layers.append(fused)
        if not layers:
            continue
        stack = [None if layers[0][f] is None else jnp.asarray(np.stack([l[f] for l in layers])) for f in range(3)]
        out[param] = QuantizedWeight(stack[0], stack[1], stack[2], layers[0][3])
    return out
