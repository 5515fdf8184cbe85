"""Pure-jnp reference for the fused residual add and RMSNorm, and the input checks it shares
with the kernel.

Glossary for shapes: T tokens, D model width, S split-K partials of the projection that
produced y, L stacked layers.

What it computes, in the order and precision of the unfused model code (models/llama.py):
  y      = sum of the partials in float32, cast to the residual's dtype (or y as given)
  x      = residual + y                       (in the residual's dtype)
  h      = x * rsqrt(mean(x ** 2) + eps)      (float32)
  llama:  out = weight * h.astype(dtype)      (cast, then scale in the dtype)
  gemma:  out = (h * (1 + weight)).astype(dtype)   (scale in float32, then cast)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import check_dtypes, layer_operand

NORM_KINDS = ("llama", "gemma")


def check_add_norm_inputs(y, residual, weight, layer, kind: str):
    """Static checks; returns (num_tokens, width, layer as int32 [1] or None)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {NORM_KINDS}, got {kind!r}")
    if residual.ndim != 2:
        raise ValueError(f"residual must be [num_tokens, width], got shape {residual.shape}")
    check_dtypes(residual=residual, weight=weight)
    t, d = residual.shape
    if y.ndim not in (2, 3) or y.shape[-2:] != (t, d):
        raise ValueError(f"y must be [{t}, {d}] or partials [splits, {t}, {d}], got shape {y.shape}")
    if y.ndim == 3 and y.dtype != jnp.float32:
        raise ValueError(f"split-K partials must be float32, got {y.dtype}")
    check_dtypes(y=y)
    if weight.shape[-1] != d or weight.ndim not in (1, 2):
        raise ValueError(f"weight must be [{d}] or stacked [num_layers, {d}], got shape {weight.shape}")
    return t, d, layer_operand(layer, weight.ndim == 2, f"weight [num_layers, width] {weight.shape}")


def finish_partials(y, dtype):
    """y as one [T, D] array in `dtype`: split-K partials summed in float32 first."""
    return (jnp.sum(y, axis=0) if y.ndim == 3 else y).astype(dtype)


def rms_norm_ordered(x, weight, eps: float, kind: str):
    """RMSNorm of x [T, D] scaled by weight [D] in the order of `kind` (see the module doc)."""
    x32 = x.astype(jnp.float32)
    h = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if kind == "gemma":
        return (h * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * h.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "kind"))
def add_rms_norm_reference(y, residual, weight, layer=None, *, eps: float, kind: str = "llama"):
    """(x, normed x) with x = residual + y (see the module doc).

    Args:
      y: [T, D] in any supported dtype, or float32 split-K partials [S, T, D].
      residual: [T, D].
      weight: [D], or [L, D] stacked layers with `layer` (int32 scalar, may be traced;
        clamped into [0, L - 1]).
    Returns:
      (x [T, D], out [T, D]), both in residual's dtype.
    """
    _, _, layer = check_add_norm_inputs(y, residual, weight, layer, kind)
    w = weight if layer is None else lax.dynamic_index_in_dim(weight, layer[0], axis=0, keepdims=False)
    x = residual + finish_partials(y, residual.dtype)
    return x, rms_norm_ordered(x, w, eps, kind)
