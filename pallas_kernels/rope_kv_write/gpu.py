"""Finishing a fused q|k|v projection on GPUs (Pallas, Triton lowering): one kernel where the
unfused model runs four or five (the sum of the projection's split-K partials, the rotary
embedding of q and of k, the scatters of k and of v into the layer's pages), and the per-head
q/k RMSNorms of the families that have them (Qwen3, Gemma 3).

At decode sizes each of those is a few microseconds of launch latency over a few kilobytes,
32 times a step for an 8B model. The kernel reads the float32 partials unsummed (or the
finished product), the step's rotary tables, and writes the rotated queries and, in place,
the new keys and values into the stacked pools (aliased in and out, so nothing is copied).

Grid (T, K * (G + 2)): program (t, c) owns head c of token t's projection (a query head, the
key or the value of kv head c // (G + 2)), so a decode's few tokens still make dozens of short
programs. It loads the head as two halves (the rotate-half pairs): every tensor is H/2 wide. The numbers follow
reference.py's order exactly; padding tokens write into their slot of page 0, as the unfused
scatter does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import load_partials_sum
from pallas_kernels.rope_kv_write.reference import check_head_norms, check_rope_kv_inputs
from pallas_kernels.rope_kv_write.tuned_block_sizes import rope_kv_write_num_warps

MIN_HALF = 8  # Triton tensors have power-of-2 sizes; no dot here, so no minimum of 16


def fusable_head_size(head_size: int) -> bool:
    """Whether the kernel tiles heads of this size (else callers take the jnp path)."""
    half = head_size // 2
    return head_size % 2 == 0 and half >= MIN_HALF and half & (half - 1) == 0


def _rope_kv_write_kernel(layer_ref, slot_ref, y_ref, cos_ref, sin_ref, *refs, splits, group, half, rows_per_layer,
                          num_layers, dtype, head_norm):
    if head_norm is not None:
        qn_ref, kn_ref, k_in, v_in, q_ref, k_ref, v_ref = refs
    else:
        k_in, v_in, q_ref, k_ref, v_ref = refs
    del k_in, v_in  # aliased to k_ref, v_ref
    t, column = pl.program_id(0), pl.program_id(1)
    kv, j = column // (group + 2), column % (group + 2)  # head j of kv head kv's group
    head = 2 * half
    layer = jnp.clip(layer_ref[0], 0, num_layers - 1)

    def load(lo):  # half `lo` of the head, in `dtype`, as float32
        y = load_partials_sum(y_ref, t, pl.ds(column * head + lo * half, half), splits)
        return y.astype(dtype).astype(jnp.float32)

    x1, x2 = load(0), load(1)
    if head_norm is not None:  # the query and key heads are RMS-normed over H before RoPE
        eps, kind = head_norm

        def weight(lo):  # this head's norm weight half: q_norm for query heads, k_norm for the key
            row = tuple(jnp.minimum(layer, r.shape[0] - 1) for r in (qn_ref, kn_ref))
            cols = pl.ds(lo * half, half)
            return jnp.where(j < group, qn_ref[row[0], cols], kn_ref[row[1], cols]).astype(jnp.float32)

        inv_rms = lax.rsqrt((jnp.sum(x1 * x1) + jnp.sum(x2 * x2)) / head + eps)

        def normed(x, lo):
            h = x * inv_rms
            if kind == "gemma":
                out = h * (1.0 + weight(lo))
            else:  # cast, then scale in the dtype (one rounding of the exact float32 product)
                out = weight(lo) * h.astype(dtype).astype(jnp.float32)
            return jnp.where(j <= group, out.astype(dtype).astype(jnp.float32), x)

        x1, x2 = normed(x1, 0), normed(x2, 1)
    cos, sin = cos_ref[t, :], sin_ref[t, :]
    o1, o2 = (x1 * cos - x2 * sin).astype(dtype), (x2 * cos + x1 * sin).astype(dtype)
    row = layer * rows_per_layer + slot_ref[t]
    lo, hi = pl.ds(0, half), pl.ds(half, half)

    @pl.when(j < group)
    def _():
        q_ref[t, kv * group + j, lo] = o1
        q_ref[t, kv * group + j, hi] = o2

    @pl.when(j == group)
    def _():
        k_ref[kv, row, lo] = o1
        k_ref[kv, row, hi] = o2

    @pl.when(j == group + 1)
    def _():  # the value is neither normed nor rotated
        v_ref[kv, row, lo] = x1.astype(dtype)
        v_ref[kv, row, hi] = x2.astype(dtype)


@functools.partial(jax.jit, static_argnames=("num_kv_heads", "dtype", "norm_eps", "norm_kind", "num_warps",
                                             "interpret"), donate_argnums=(3, 4))
def rope_kv_write(qkv, cos, sin, k_pages, v_pages, slot_mapping, layer, *, num_kv_heads: int, dtype=None,
                  q_norm=None, k_norm=None, norm_eps: float = 1e-6, norm_kind: str = "llama",
                  num_warps: int | None = None, interpret: bool = False):
    """(q [T, K * G, H], k_pages, v_pages): the rotated queries, and the pools with this step's
    rotated keys and values written into layer `layer` in place, the query and key heads
    RMS-normed first with q_norm / k_norm (reference.py says what and in which order; its
    docstring gives the arguments).

    num_warps: Triton warps per program (default: tuned_block_sizes).
    interpret: Pallas interpret mode (any backend, e.g. CPU tests).
    """
    t, g, h, dtype, layer = check_rope_kv_inputs(qkv, cos, sin, k_pages, v_pages, slot_mapping, layer,
                                                 num_kv_heads, dtype)
    if not fusable_head_size(h):
        raise ValueError(f"head size {h}: the kernel needs H/2 a power of 2 of at least {MIN_HALF}; "
                         "use the reference (jnp) path")
    kh, num_layers, p, ps, _ = k_pages.shape
    check_head_norms(q_norm, k_norm, h, num_layers, norm_kind)
    flat = (kh, num_layers * p * ps, h)  # a free reshape: a kv head's layers are contiguous
    kernel = functools.partial(_rope_kv_write_kernel, splits=qkv.shape[0] if qkv.ndim == 3 else None,
                               group=g, half=h // 2, rows_per_layer=p * ps, num_layers=num_layers, dtype=dtype,
                               head_norm=None if q_norm is None else (float(norm_eps), norm_kind))
    norms = () if q_norm is None else tuple(w.reshape(-1, h) for w in (q_norm, k_norm))  # [H] as one row
    operands = (layer, slot_mapping, qkv, cos, sin, *norms, k_pages.reshape(flat), v_pages.reshape(flat))

    def whole(shape):
        return pl.BlockSpec(shape, lambda *_, nd=len(shape): (0,) * nd)

    pool = jax.ShapeDtypeStruct(flat, dtype)
    q_out = jax.ShapeDtypeStruct((t, kh * g, h), dtype)
    q, k_flat, v_flat = pl.pallas_call(
        kernel,
        grid=(t, kh * (g + 2)),
        in_specs=[whole(a.shape) for a in operands],
        out_specs=(whole(q_out.shape), whole(flat), whole(flat)),
        out_shape=(q_out, pool, pool),
        input_output_aliases={len(operands) - 2: 1, len(operands) - 1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or rope_kv_write_num_warps(h), num_stages=1),
        interpret=interpret,
        name="rope_kv_write",
    )(*operands)
    return q, k_flat.reshape(k_pages.shape), v_flat.reshape(v_pages.shape)
