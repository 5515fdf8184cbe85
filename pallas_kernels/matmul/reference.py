"""Pure-jnp reference for the skinny (decode) matmul y[T, N] = x[T, K] @ w[K, N], and the input
checks it shares with the kernel.

Glossary for shapes: T tokens, K input features (contracted), N output features, L stacked
layers. A stacked weight w_lkn [L, K, N] comes with an int32 `layer` selecting w_lkn[layer].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import check_dtypes, layer_operand


def check_matmul_inputs(x, w, layer):
    """Static checks of x [T, K] against w [K, N] or w [L, K, N] (then `layer` is required).

    Returns (num_tokens, k, n, layer as int32 [1] or None). `layer` may be a Python int or an
    integer scalar array, traced or not.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [num_tokens, k], got shape {x.shape}")
    if w.ndim not in (2, 3):
        raise ValueError(f"w must be [k, n] or stacked [num_layers, k, n], got shape {w.shape}")
    check_dtypes(x=x, w=w)
    if x.dtype != w.dtype:
        raise ValueError(f"x dtype {x.dtype} must equal w dtype {w.dtype}")
    num_tokens, k = x.shape
    if w.shape[-2] != k:
        raise ValueError(f"x has k = {k} features but w has {w.shape[-2]} rows (shape {w.shape})")
    if num_tokens < 1 or k < 1 or w.shape[-1] < 1:
        raise ValueError(f"empty matmul: x {x.shape}, w {w.shape}")
    if w.ndim == 3 and w.shape[0] < 1:
        raise ValueError(f"stacked weight has no layers: shape {w.shape}")
    return num_tokens, k, w.shape[-1], layer_operand(layer, w.ndim == 3, f"weight [num_layers, k, n] {w.shape}")


# The gated MLP's activations by name (the kernel's epilogue, this reference and the models'
# unfused path all take them from here).
GATED_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda g: jax.nn.gelu(g, approximate=True),
}


def gated_product(gate, up, activation: str, dtype):
    """act(gate) * up in float32 from float32 products, each product rounded to `dtype` first as
    when the two halves are stored and read back (the unfused path's numbers, up to the last
    rounding)."""
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(GATED_ACTIVATIONS)}, got {activation!r}")
    g = gate.astype(dtype).astype(jnp.float32)
    return GATED_ACTIVATIONS[activation](g) * up.astype(dtype).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("activation",))
def skinny_matmul_reference(x, w, layer=None, *, activation: str | None = None):
    """x @ w (or x @ w[layer]) in float32 with exact float32 products, cast to x.dtype.

    Args:
      x: [T, K].
      w: [K, N], or [L, K, N] stacked layers.
      layer: int32 scalar (may be traced), required iff w is stacked; out-of-range values are
        clamped into [0, L - 1] (lax.dynamic_index_in_dim), as the kernel does.
      activation: None, or "silu" / "gelu_tanh" for the gated product act(x @ gate) * (x @ up)
        of w's column halves gate | up (jax.nn's functions, in float32).
    Returns:
      [T, N] (gated: [T, N / 2]) in x.dtype.
    """
    _, _, _, layer = check_matmul_inputs(x, w, layer)
    w_kn = w if layer is None else lax.dynamic_index_in_dim(w, layer[0], axis=0, keepdims=False)
    y = jnp.dot(x.astype(jnp.float32), w_kn.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    if activation is None:
        return y.astype(x.dtype)
    return gated_product(*jnp.split(y, 2, axis=-1), activation, x.dtype).astype(x.dtype)
