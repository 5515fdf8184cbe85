"""compressed-tensors fp8 checkpoints (`quant_method: "compressed-tensors"`, format
"float-quantized", as llm-compressor writes them for vLLM) with their projections kept in fp8.

Each linear module holds `weight` as float8_e4m3fn [N, K] and `weight_scale`, one per output
channel ([N, 1], strategy "channel") or one for the tensor (strategy "tensor"); w = f * s.
That is the kernel's fp8 layout transposed, with the scale per column ([1, N]). Activation
scales (`input_scale`) are for fp8 x fp8 matmuls; weight-only execution does not need them.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxinfer.errors import CheckpointError
from pallas_kernels.quantized_matmul.layout import QuantLayout


def check_config(q: Mapping[str, Any]) -> None:
    """Refuses compressed-tensors configurations other than fp8 e4m3 weights per channel or
    tensor, by name."""
    if q.get("format") not in ("float-quantized", "naive-quantized"):
        raise CheckpointError(f"compressed-tensors format {q.get('format')!r} is not supported (float-quantized only)")
    for name, group in (q.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if w.get("num_bits") != 8 or w.get("type") != "float" or w.get("strategy") not in ("channel", "tensor"):
            raise CheckpointError(f"compressed-tensors group {name!r}: weights {w} are not supported (8-bit float, "
                                  "per channel or per tensor)")


def codes_from_fp8(get, module: str):
    """(values [K, N] float8_e4m3fn, scales [1, N] float32, None, layout) of one module."""
    w = np.asarray(get(module + ".weight"))
    if w.dtype.name != "float8_e4m3fn":
        return None  # a module left unquantized (the config's `ignore` list)
    n, k = w.shape
    scale = np.asarray(get(module + ".weight_scale"), np.float32).reshape(-1)
    if scale.size not in (1, n):
        raise CheckpointError(f"{module}.weight_scale has {scale.size} values for {n} output channels")
    scales = np.broadcast_to(scale, (n,)).reshape(1, n).copy()
    return np.ascontiguousarray(w.T), scales, None, QuantLayout("fp8", k)


def fp8_layer_weights(config, get) -> dict:
    """{param name: QuantizedWeight} of a compressed-tensors fp8 checkpoint's projections."""
    from jaxinfer.loading.quantized_layers import stack_projection_codes

    out = stack_projection_codes(config, lambda module: codes_from_fp8(get, module))
    missing = {"w_qkv", "w_o", "w_gate_up", "w_down"} - set(out)
    if missing:  # their fp8 parts would load as floats without their scales
        raise CheckpointError(f"compressed-tensors checkpoint: {sorted(missing)} are not fp8 in every part and "
                              "layer, which is not supported")
    return out
