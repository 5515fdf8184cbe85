"""AWQ and GPTQ checkpoints (4-bit, the safetensors layouts AutoAWQ and AutoGPTQ/GPTQModel
write, as HF `quantization_config` names them) as `QuantizedWeight`s, without dequantizing.

Per linear module, with K inputs, N outputs and groups of g inputs:
  AWQ (GEMM):  qweight int32 [K, N / 8]: the 8 codes of a word are columns 8c + o[j] at bits
               4j, o = (0, 2, 4, 6, 1, 3, 5, 7); qzeros int32 [K / g, N / 8] packed alike;
               scales [K / g, N]. w = (u - z) * s.
  GPTQ:        qweight int32 [K / 8, N]: rows 8i + j at bits 4j; qzeros int32 [K / g, N / 8]:
               columns 8c + j at bits 4j; scales [K / g, N]; g_idx int32 [K] (the group of each
               input). w = (u - z') * s with z' = z + 1 in the original GPTQ format
               (checkpoint_format "gptq") and z' = z in GPTQModel's "gptq_v2".
Both become the kernel's int4 layout (pack = group = g) with offsets m = -z' * s. GPTQ's
act-order (a g_idx that is not [i // g]) is refused: its groups are not runs of rows.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxinfer.errors import CheckpointError
from pallas_kernels.quantized_matmul.layout import QuantLayout, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
METHODS = ("awq", "gptq")


def quantization_of(hf_config: Mapping[str, Any]) -> dict | None:
    """The checkpoint's `quantization_config` if it is one jaxinfer runs (AWQ or GPTQ, 4-bit;
    compressed-tensors fp8, see fp8_weights.py),
    None for an unquantized checkpoint; anything else is refused by name."""
    q = hf_config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "compressed-tensors":
        from jaxinfer.loading.fp8_weights import check_config

        check_config(q)
        return dict(q)
    if method not in METHODS:
        raise CheckpointError(f"quantization_config.quant_method {method!r} is not supported (supported: "
                              f"{', '.join(METHODS)}, compressed-tensors fp8; or load an unquantized checkpoint)")
    if q.get("bits", q.get("w_bit")) != 4:
        raise CheckpointError(f"{method} checkpoints with {q.get('bits', q.get('w_bit'))} bits are not supported "
                              "(4 bits only)")
    if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
        raise CheckpointError(f"AWQ version {q.get('version')!r} is not supported (GEMM only)")
    if method == "gptq" and q.get("desc_act"):
        raise CheckpointError("GPTQ checkpoints quantized with desc_act (act-order) are not supported yet")
    return dict(q)


def _nibbles(words: np.ndarray, axis: int) -> np.ndarray:
    """int32 words -> their 8 4-bit codes (bits 4j is code j), laid along `axis` (x8)."""
    w = words.astype(np.uint32)
    codes = np.stack([(w >> (4 * j)) & 0xF for j in range(8)], axis=axis + 1)
    shape = list(words.shape)
    shape[axis] *= 8
    return codes.astype(np.uint8).reshape(shape)


def _awq_columns(words: np.ndarray) -> np.ndarray:
    """AWQ-packed int32 [R, N / 8] -> codes [R, N] in column order."""
    stored = _nibbles(words, axis=1).reshape(words.shape[0], -1, 8)  # position j of word c
    codes = np.empty_like(stored)
    codes[:, :, list(AWQ_ORDER)] = stored
    return codes.reshape(words.shape[0], -1)


def codes_from_packed(get, names, module: str, q: Mapping[str, Any]):
    """(values, scales, offsets, layout) of one AWQ/GPTQ linear module (names `module`.qweight, ...)."""
    qweight = np.asarray(get(module + ".qweight"))
    qzeros = np.asarray(get(module + ".qzeros"))
    scales = np.asarray(get(module + ".scales"))
    groups, n = scales.shape
    if q["quant_method"] == "awq":
        codes = _awq_columns(qweight)
        zeros = _awq_columns(qzeros).astype(np.float32)
    else:
        codes = _nibbles(qweight, axis=0)
        zeros = _nibbles(qzeros, axis=1).astype(np.float32)
        if str(q.get("checkpoint_format", "gptq")).lower() != "gptq_v2":
            zeros = zeros + 1  # the original format stores zero - 1
    k = codes.shape[0]
    if codes.shape != (k, n) or zeros.shape != (groups, n) or k % groups:
        raise CheckpointError(f"{module}: qweight {qweight.shape}, qzeros {qzeros.shape} and scales {scales.shape} "
                              f"do not describe one 4-bit weight")
    g = k // groups
    if q["quant_method"] == "gptq":
        g_idx = get(module + ".g_idx") if module + ".g_idx" in names else None
        if g_idx is not None and not np.array_equal(np.asarray(g_idx), np.arange(k) // g):
            raise CheckpointError(f"{module}: g_idx is not [i // {g}] (act-order), which is not supported yet")
    offsets = -(zeros * scales.astype(np.float32))
    return pack_int4(codes, g), scales, offsets, QuantLayout("int4", g, g)


def packed_layer_weights(config, get, names, q: Mapping[str, Any]) -> dict:
    """{param name: QuantizedWeight} of every decoder projection of an AWQ/GPTQ checkpoint."""
    from jaxinfer.loading.quantized_layers import stack_projection_codes

    out = stack_projection_codes(config, lambda module: codes_from_packed(get, names, module, q))
    missing = {"w_qkv", "w_o", "w_gate_up", "w_down"} - set(out)
    if missing:
        raise CheckpointError(f"{q['quant_method']} checkpoint: {sorted(missing)} do not share one group size "
                              "across their parts and layers")
    return out
