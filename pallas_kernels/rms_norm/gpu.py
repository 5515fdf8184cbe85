"""Fused residual add and RMSNorm on GPUs (Pallas, Triton lowering): one kernel where the
unfused model runs three or four (the sum of a projection's split-K partials and the residual
add, the slice of this layer's norm weight out of the stack, the norm itself).

At decode sizes each of those is a few microseconds of launch latency over a few kilobytes:
an 8B model runs 64 of these sequences a step. The kernel takes the projection's float32
split-K partials unsummed (pallas_kernels/matmul, `sum_partials=False`) or a finished [T, D]
product, the residual, and the stacked norm weights with the layer index read inside the
kernel (no copy of weight[layer]), and writes both the new residual and its norm.

Grid (T,): program t owns token row t. It walks the row in power-of-2 chunks that divide D
(tuned_block_sizes): with one chunk the row stays in registers; with several, a first pass
writes x and sums its squares and a second recomputes x chunk by chunk (re-reading S + 1
rows from L2 rather than reading back its own writes, which other threads of the program
made) to write the norm. The numbers follow reference.py's order exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import load_partials_sum
from pallas_kernels.rms_norm.reference import check_add_norm_inputs
from pallas_kernels.rms_norm.tuned_block_sizes import RmsNormBlockSizes, rms_norm_block_sizes


def _add_rms_norm_kernel(*refs, splits, chunk, num_chunks, width, eps, kind, stacked):
    if stacked:
        layer_ref, y_ref, r_ref, w_ref, x_ref, h_ref = refs
        lead = (jnp.clip(layer_ref[0], 0, w_ref.shape[0] - 1),)  # clamped, never a bad address
    else:
        y_ref, r_ref, w_ref, x_ref, h_ref = refs
        lead = ()
    t = pl.program_id(0)
    dtype = r_ref.dtype

    def residual_sum(c):  # x for columns of chunk c, in the residual's dtype
        cols = pl.ds(c * chunk, chunk)
        y = load_partials_sum(y_ref, t, cols, splits).astype(dtype).astype(jnp.float32)
        return (r_ref[t, cols].astype(jnp.float32) + y).astype(dtype)

    def write_norm(c, x, inv_rms):
        cols = pl.ds(c * chunk, chunk)
        h = x.astype(jnp.float32) * inv_rms
        w = w_ref[(*lead, cols)]
        if kind == "gemma":
            out = h * (1.0 + w.astype(jnp.float32))
        else:  # cast, then scale in the dtype (one rounding of the exact float32 product)
            out = w.astype(jnp.float32) * h.astype(dtype).astype(jnp.float32)
        h_ref[t, cols] = out.astype(dtype)

    xs, sum_sq = [], jnp.zeros((), jnp.float32)
    for c in range(num_chunks):
        x = residual_sum(c)
        x_ref[t, pl.ds(c * chunk, chunk)] = x
        x32 = x.astype(jnp.float32)
        sum_sq = sum_sq + jnp.sum(x32 * x32)
        if num_chunks == 1:
            xs.append(x)
    inv_rms = lax.rsqrt(sum_sq / width + eps)
    for c in range(num_chunks):
        write_norm(c, xs[c] if num_chunks == 1 else residual_sum(c), inv_rms)


def fusable_width(width: int) -> bool:
    """Whether the kernel tiles rows of this width (else callers take the jnp path)."""
    return rms_norm_block_sizes(width) is not None


@functools.partial(jax.jit, static_argnames=("eps", "kind", "block_sizes", "interpret"))
def add_rms_norm(y, residual, weight, layer=None, *, eps: float, kind: str = "llama",
                 block_sizes: RmsNormBlockSizes | None = None, interpret: bool = False):
    """(x, normed x) with x = residual + y, in one kernel (reference.py says what and in
    which order).

    Args:
      y: a projection's output [T, D], or its float32 split-K partials [S, T, D].
      residual: [T, D] (float32, bfloat16 or float16).
      weight: the norm's scale [D], or [L, D] stacked layers passed whole with `layer`.
      layer: int32 scalar (may be traced), required iff weight is stacked; clamped into range.
      eps: the norm's epsilon.
      kind: "llama" (cast, then scale) or "gemma" (scale by 1 + weight in float32, then cast).
      block_sizes: how a row is walked (default from the width; see tuned_block_sizes).
      interpret: Pallas interpret mode (any backend, e.g. CPU tests).
    Returns:
      (x [T, D], out [T, D]) in residual's dtype.
    """
    num_tokens, width, layer = check_add_norm_inputs(y, residual, weight, layer, kind)
    bs = block_sizes or rms_norm_block_sizes(width)
    if bs is None or width % bs.chunk:
        raise ValueError(f"width {width} has no power-of-2 chunk of at least 16 dividing it; "
                         "use the reference (jnp) path")
    kernel = functools.partial(_add_rms_norm_kernel, splits=y.shape[0] if y.ndim == 3 else None,
                               chunk=bs.chunk, num_chunks=width // bs.chunk, width=width, eps=eps,
                               kind=kind, stacked=layer is not None)
    operands = (y, residual, weight) if layer is None else (layer, y, residual, weight)

    def whole(a):
        return pl.BlockSpec(a.shape, lambda *_, nd=a.ndim: (0,) * nd)

    out = jax.ShapeDtypeStruct(residual.shape, residual.dtype)
    return pl.pallas_call(
        kernel,
        grid=(num_tokens,),
        in_specs=[whole(a) for a in operands],
        out_specs=(whole(out), whole(out)),
        out_shape=(out, out),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(*operands)
