"""How a quantized weight is stored, and the pure-jnp reference that reads it.

A quantized weight of logical shape [K, N] (or stacked [L, K, N]: the layer axis leads every
array below) is three arrays and a static `QuantLayout`:

  values   int8 [K, N]              kind "int8": w = q * s (+ m)
           float8_e4m3fn [K, N]     kind "fp8":  w = f * s
           uint8 [K / 2, N]         kind "int4": two 4-bit codes u in [0, 15] a byte,
                                    w = (u - 8) * s without offsets, u * s + m with them
  scales   [K / group_size, N]      one scale per group of `group_size` consecutive rows and
                                    column (group_size = K: one per output channel)
  offsets  [K / group_size, N] or None   the additive term m (asymmetric formats: GGUF Q4_1
                                    and Q4_K, AWQ/GPTQ zero points as m = -z * s)

int4 packing: rows are paired within blocks of `pack_size` rows; in block b, byte i (0 <= i <
pack_size / 2) holds row b * pack_size + i in its low nibble and row b * pack_size +
pack_size / 2 + i in its high nibble. This is GGUF's Q4_0/Q4_1 block layout (pack 32) and
Q4_K's (pack 64, groups of 32), so those blocks need only a transpose to become this layout,
and a kernel unpacks a block into two contiguous row ranges with two shifts, no interleave.

Glossary: T tokens, K input features (contracted), N output features, L stacked layers,
G = K / group_size groups.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

KINDS = ("int8", "int4", "fp8")
VALUE_DTYPES = {"int8": jnp.dtype(jnp.int8), "int4": jnp.dtype(jnp.uint8), "fp8": jnp.dtype(jnp.float8_e4m3fn)}
INT4_ZERO = 8  # the code of zero in symmetric int4


@dataclasses.dataclass(frozen=True)
class QuantLayout:
    """The static description of a quantized weight's storage (see the module docstring).

    kind: "int8", "int4" or "fp8".
    group_size: rows sharing one scale (and offset); the weight's K for per-channel scales.
    pack_size: int4 only: the row block whose two halves share bytes (each half whole groups,
      as GGUF's Q4_K: pack 64, groups 32; or within one group: pack = group = 128 for our own
      int4); 0 for the byte-per-value kinds.
    """

    kind: str
    group_size: int
    pack_size: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"quantization kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if self.kind == "int4":
            p, g = self.pack_size, self.group_size
            if not isinstance(p, int) or p < 2 or p % 2:
                raise ValueError(f"int4 needs an even pack_size >= 2, got {p!r}")
            # A pack block's two halves must each be whole groups (or lie inside one group).
            if not ((p // 2) % g == 0 or g % p == 0):
                raise ValueError(f"int4 pack_size {p} and group_size {g}: each half of a pack block must "
                                 "hold whole groups, or a group whole pack blocks")
        elif self.pack_size != 0:
            raise ValueError(f"pack_size is for int4 only, got {self.pack_size} for {self.kind}")

    def value_rows(self, k: int) -> int:
        """Rows of the values array for a weight of k rows."""
        return k // 2 if self.kind == "int4" else k

    def check(self, values, scales, offsets, k: int | None = None) -> tuple[int, int]:
        """Static checks of the arrays against the layout; returns the logical (k, n)."""
        if values.ndim not in (2, 3):
            raise ValueError(f"values must be [k, n] or stacked [num_layers, k, n], got shape {values.shape}")
        if jnp.dtype(values.dtype) != VALUE_DTYPES[self.kind]:
            raise ValueError(f"{self.kind} values must be {VALUE_DTYPES[self.kind]}, got {values.dtype}")
        rows, n = values.shape[-2:]
        k = rows * 2 if self.kind == "int4" else rows
        if k % self.group_size:
            raise ValueError(f"k = {k} is not a multiple of group_size {self.group_size}")
        if self.kind == "int4" and k % self.pack_size:
            raise ValueError(f"k = {k} is not a multiple of pack_size {self.pack_size}")
        expected = (*values.shape[:-2], k // self.group_size, n)
        for name, a in (("scales", scales), ("offsets", offsets)):
            if a is None:
                continue
            if tuple(a.shape) != expected:
                raise ValueError(f"{name} must have shape {expected} for values {values.shape}, got {a.shape}")
            if not jnp.issubdtype(a.dtype, jnp.floating):
                raise ValueError(f"{name} must be floating point, got {a.dtype}")
        if offsets is not None and self.kind == "fp8":
            raise ValueError("fp8 weights take no offsets")
        return k, n


def unpack_int4(packed, pack_size: int):
    """uint8 [.., K / 2, N] -> uint8 codes [.., K, N] in row order (see the module docstring)."""
    *lead, rows, n = packed.shape
    blocks = packed.reshape(*lead, rows // (pack_size // 2), pack_size // 2, n)
    lo = blocks & 0xF
    hi = blocks >> 4
    return jnp.concatenate([lo, hi], axis=-2).reshape(*lead, 2 * rows, n)


def pack_int4(codes, pack_size: int):
    """uint8 codes [.., K, N] in [0, 15] -> uint8 [.., K / 2, N] (the inverse of unpack_int4)."""
    *lead, k, n = codes.shape
    blocks = codes.astype(jnp.uint8).reshape(*lead, k // pack_size, 2, pack_size // 2, n)
    return (blocks[..., 0, :, :] | (blocks[..., 1, :, :] << 4)).reshape(*lead, k // 2, n)


def dequantize(values, scales, offsets, layout: QuantLayout, dtype=jnp.float32):
    """The float weight [.., K, N] the arrays stand for, computed in float32, cast to dtype."""
    if layout.kind == "int4":
        q = unpack_int4(values, layout.pack_size).astype(jnp.float32)
        if offsets is None:
            q = q - INT4_ZERO
    else:
        q = values.astype(jnp.float32)
    k = q.shape[-2]
    groups = k // layout.group_size
    shape = (*q.shape[:-2], groups, layout.group_size, q.shape[-1])
    w = q.reshape(shape) * scales.astype(jnp.float32)[..., :, None, :]
    if offsets is not None:
        w = w + offsets.astype(jnp.float32)[..., :, None, :]
    return w.reshape(q.shape).astype(dtype)


def select_layer(a, layer):
    """a[layer] of a stacked array (layer clamped, as lax.dynamic_index_in_dim does), or a."""
    if a is None or layer is None:
        return a
    return lax.dynamic_index_in_dim(a, jnp.asarray(layer).reshape(()), axis=0, keepdims=False)


def quantized_matmul_reference(x, values, scales, offsets=None, layer=None, *, layout: QuantLayout):
    """x @ dequantize(values[layer], ...) in float32 with exact float32 products, cast to x.dtype.

    Args:
      x: [T, K] activations (float32, bfloat16 or float16).
      values, scales, offsets: the weight's arrays (see the module docstring), stacked on a
        leading layer axis or not.
      layer: int32 scalar selecting a stacked weight's layer (may be traced); None otherwise.
      layout: the weight's QuantLayout.
    Returns:
      [T, N] in x.dtype.
    """
    k, _ = layout.check(values, scales, offsets)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [num_tokens, {k}], got shape {x.shape}")
    if (values.ndim == 3) != (layer is not None):
        raise ValueError("layer is required for stacked [num_layers, ...] arrays, and only for them")
    w = dequantize(select_layer(values, layer), select_layer(scales, layer), select_layer(offsets, layer), layout)
    y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)
