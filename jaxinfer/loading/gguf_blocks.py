"""GGUF quantized blocks as the quantized matmul's layout (pallas_kernels/quantized_matmul),
without going through floats: the codes are kept and only moved.

A GGUF linear weight is [out, in] with blocks along `in`; the kernel reads W [K = in, N = out]
with groups along K, so each block becomes one group of one column. Per type (llama.cpp's
definitions; each block's fields as gguf-py names them):

  Q8_0  d, 32 x int8 q:                  w = d * q          -> int8, groups of 32
  Q4_0  d, 16 bytes, nibbles j | j+16:   w = d * (u - 8)    -> int4, pack 32, groups of 32
  Q4_1  d, m, 16 bytes as Q4_0:          w = d * u + m      -> int4 with offsets, pack 32
  Q4_K  d, dmin, 8 x 6-bit (sc, mn), 128 bytes, nibbles l | l+32 in each 64:
                                         w = d*sc_j * u - dmin*mn_j   -> int4, pack 64, groups of 32
  Q6_K  ql, qh, 16 x int8 sc, d: 6-bit q - 32:
                                         w = d*sc_j * q     -> int8, groups of 16

The int4 byte layouts are the kernel's own (that is why it packs rows b and b + pack/2 in one
byte), so those bytes are transposed, not re-packed. Scales: Q8_0/Q4_0/Q4_1 keep their float16
d and m (exact); the K types' products d * sc are kept in float32 (exact: a float16 times a
6- or 8-bit integer). The result is exactly the weight gguf-py's dequantization gives.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from pallas_kernels.quantized_matmul.layout import QuantLayout

NATIVE_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K)


def block_layout(ggml_type) -> QuantLayout:
    """The kernel layout a GGUF block type maps onto (group and pack sizes per block type)."""
    return {T.Q8_0: QuantLayout("int8", 32), T.Q4_0: QuantLayout("int4", 32, 32),
            T.Q4_1: QuantLayout("int4", 32, 32), T.Q4_K: QuantLayout("int4", 32, 64),
            T.Q6_K: QuantLayout("int8", 16)}[ggml_type]


def _f16(b) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def codes_from_blocks(data: np.ndarray, ggml_type, shape: tuple[int, int]):
    """(values [K(/2), N], scales [K/g, N], offsets or None) of a GGUF weight [out = N, in = K]
    stored as `data` (uint8 [out, bytes per row])."""
    n, k = shape
    block_elems, block_bytes = quants.GGML_QUANT_SIZES[ggml_type]
    blocks = np.asarray(data, np.uint8).reshape(n, k // block_elems, block_bytes)
    offsets = None
    if ggml_type == T.Q8_0:
        scales = _f16(blocks[..., 0:2])                                   # [N, K/32]
        values = blocks[..., 2:].view(np.int8).reshape(n, k)              # [N, K]
    elif ggml_type in (T.Q4_0, T.Q4_1):
        scales = _f16(blocks[..., 0:2])
        if ggml_type == T.Q4_1:
            offsets = _f16(blocks[..., 2:4])
        values = blocks[..., -16:].reshape(n, k // 2)                     # bytes in the kernel's order
    elif ggml_type == T.Q4_K:
        d = _f16(blocks[..., 0:2]).astype(np.float32)[..., None]          # [N, K/256, 1]
        dmin = _f16(blocks[..., 2:4]).astype(np.float32)[..., None]
        sc, mn = quants.Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))
        scales = (d * sc.reshape(n, -1, 8).astype(np.float32)).reshape(n, -1)   # [N, K/32]
        offsets = -(dmin * mn.reshape(n, -1, 8).astype(np.float32)).reshape(n, -1)
        values = blocks[..., 16:].reshape(n, k // 2)                      # 64-element chunks: l | l+32
    elif ggml_type == T.Q6_K:
        ql = blocks[..., :128].reshape(n, -1, 2, 64)                      # two halves of 128 elements
        qh = blocks[..., 128:192].reshape(n, -1, 2, 32)
        sc = blocks[..., 192:208].view(np.int8).astype(np.float32)        # [N, K/256, 16]
        d = _f16(blocks[..., 208:210]).astype(np.float32)[..., None]
        # Within each half of 128: element 32*s + l takes ql nibble (s in {0,1}: low, {2,3}: high
        # of byte (s % 2) * 32 + l) and qh bits 2*s of byte l.
        lo = np.stack([ql[..., 0:32] & 0xF, ql[..., 32:64] & 0xF, ql[..., 0:32] >> 4, ql[..., 32:64] >> 4], axis=-2)
        hi = np.stack([(qh >> (2 * s)) & 3 for s in range(4)], axis=-2)
        q = ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8)      # [N, K/256, 2, 4, 32]
        values = q.reshape(n, k)
        scales = (d * sc).reshape(n, -1)                                  # [N, K/16]
    else:
        raise ValueError(f"{ggml_type.name} blocks have no native layout (types: "
                         f"{', '.join(t.name for t in NATIVE_TYPES)})")
    # [out, in] -> [in, out]: the kernel's K rows, N columns.
    values = np.ascontiguousarray(values.T)
    scales = np.ascontiguousarray(scales.T)
    offsets = None if offsets is None else np.ascontiguousarray(offsets.T)
    return values, scales, offsets



def native_layer_weights(checkpoint) -> dict:
    """{param name: QuantizedWeight stacked over layers} for each decoder projection whose
    every layer's GGUF tensors share one native block type (a mixed file, such as llama.cpp's
    *_K_M presets that keep some layers in Q6_K, leaves that projection to the float path)."""
    from jaxinfer.loading.quantized_layers import stack_projection_codes

    def codes_for(module: str):
        t = checkpoint.tensor(module + ".weight")
        if t.ggml_type not in NATIVE_TYPES:
            return None
        return (*codes_from_blocks(t.data, t.ggml_type, t.shape), block_layout(t.ggml_type))

    return stack_projection_codes(checkpoint.config, codes_for)
