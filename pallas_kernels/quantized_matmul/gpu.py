"""Skinny matmul over a quantized weight on GPUs (Pallas, Triton lowering): y[T, N] = x[T, K]
@ W[K, N] for few tokens, W stored as int8, fp8 or packed int4 codes with scales (and offsets)
per group of rows (layout.py). Decode reads every weight byte once, so fewer bytes per weight
is time saved; the codes are widened to x's dtype in registers, never written back.

The grid and the weight stream are the dense skinny kernel's (pallas_kernels/matmul/gpu.py):
programs (token block, column strip of block_n, split-K slice) walk their rows block_k at a
time, the [block_n, rows] accumulator taken as W_tile^T @ x_tile^T so the dot's M side is
block_n. What differs is the inner step, which runs over "segments": row ranges that share
one scale row. Per-channel scales (group_size = K) multiply the accumulator once at the end;
grouped scales multiply each segment's partial product before it is added (y = sum over
groups of s_g * (x_g @ q_g) + m_g * sum(x_g)), so the float weight never exists.

int4: a segment loads [seg, block_n] bytes once and takes two dots from it, the low nibbles
against one x column range and the high nibbles against the range pack_size / 2 later.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.matmul.gpu import weight_stream_call
from pallas_kernels.matmul.tuned_block_sizes import GpuMatmulBlockSizes, rows_per_program
from pallas_kernels.quantized_matmul.layout import INT4_ZERO, QuantLayout
from pallas_kernels.quantized_matmul.tuned_block_sizes import quantized_block_sizes, row_unit


def _segments(layout: QuantLayout, block_k: int, per_channel: bool):
    """Static plan of one inner step: (byte row offset, byte rows, [(x column offset, nibble or
    None)]) per load; rows are relative to the step's first logical row."""
    if layout.kind != "int4":
        seg = block_k if per_channel else layout.group_size
        return [(r, seg, [(r, None)]) for r in range(0, block_k, seg)]
    p = layout.pack_size
    seg = min(layout.group_size, p // 2)
    plan = []
    for b in range(0, block_k, p):
        for r in range(0, p // 2, seg):
            plan.append((b // 2 + r, seg, [(b + r, "lo"), (b + p // 2 + r, "hi")]))
    return plan


def _codes(raw, nibble, has_offsets, dtype):
    """A loaded tile's codes as `dtype` values (before scales): int8/fp8 widened; an int4
    byte tile's low or high nibbles, less the zero code for symmetric int4."""
    if nibble is None:
        return raw.astype(dtype)
    code = ((raw & 0xF) if nibble == "lo" else (raw >> 4)).astype(jnp.int32)
    if not has_offsets:
        code = code - INT4_ZERO
    return code.astype(dtype)


def _kernel(*refs, layout: QuantLayout, mode: str, num_tokens, rows, block_n, block_k, steps, split_k,
            stacked, has_offsets, per_channel):
    """mode: "dot_swap" (acc [block_n, rows] = W^T x^T on tensor cores), "dot" (acc [rows,
    block_n] = x W) or "reduce" (no tensor cores: per token row, a [seg, block_n] multiply
    and a sum over rows; for one to a few tokens, where a dot is mostly padding)."""
    refs = list(refs)
    layer_ref = refs.pop(0) if stacked else None
    x_ref, v_ref, s_ref = refs[:3]
    m_ref = refs[3] if has_offsets else None
    o_ref = refs[-1]
    # Clamped like lax.dynamic_index_in_dim, so a bad index is never an address.
    lead = (jnp.clip(layer_ref[0], 0, v_ref.shape[0] - 1),) if stacked else ()
    t, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t0 = t * rows
    n0 = pl.multiple_of(j * block_n, block_n)
    k_base = s * (steps * block_k)
    masked = mode != "reduce" and num_tokens % rows != 0
    int4 = layout.kind == "int4"
    plan = _segments(layout, block_k, per_channel)
    # float32 inputs get exact products; Triton's default for them would be TF32.
    precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None
    # Codes widen to the activations' dtype for a dot (exact: |codes| <= 127, e4m3 fits in
    # bf16), to float32 for the reduction.
    cdt = jnp.float32 if mode == "reduce" else x_ref.dtype

    def load_x(k0, width):
        tile = x_ref.at[pl.ds(t0, rows), pl.ds(k0, width)]
        if not masked:
            return tile[...]
        ok = (t0 + lax.broadcasted_iota(jnp.int32, (rows, width), 0)) < num_tokens
        return plgpu.load(tile, mask=ok, other=0)

    def scale_vec(ref, g):
        return ref[(*lead, g, pl.ds(n0, block_n))].astype(jnp.float32)  # [block_n]

    def shaped(vec):  # a per-column vector, shaped to multiply the accumulator
        if mode == "dot_swap":
            return vec[:, None]
        return vec[None, :]

    def body(i, acc):
        k0 = pl.multiple_of(k_base + i * block_k, block_k)
        acc = list(acc)
        for byte_off, seg, uses in plan:
            vrow = (k0 // 2 if int4 else k0) + byte_off
            raw = v_ref[(*lead, pl.ds(vrow, seg), pl.ds(n0, block_n))]  # [seg, block_n]
            for x_off, nibble in uses:
                w = _codes(raw, nibble, has_offsets, cdt)
                g = None if per_channel else (k0 + x_off) // layout.group_size
                if mode == "reduce":
                    for r in range(rows):
                        xr = x_ref[t0 + r, pl.ds(k0 + x_off, seg)].astype(jnp.float32)  # [seg]
                        part = jnp.sum(w * xr[:, None], axis=0)  # [block_n]
                        if g is not None:
                            part = part * scale_vec(s_ref, g)
                            if has_offsets:
                                part = part + scale_vec(m_ref, g) * jnp.sum(xr)
                        acc[r] = acc[r] + part
                    continue
                x = load_x(k0 + x_off, seg)  # [rows, seg]
                if mode == "dot_swap":
                    part = lax.dot_general(w, x, (((0,), (1,)), ((), ())), precision=precision,
                                           preferred_element_type=jnp.float32)  # [block_n, rows]
                else:
                    part = lax.dot_general(x, w, (((1,), (0,)), ((), ())), precision=precision,
                                           preferred_element_type=jnp.float32)  # [rows, block_n]
                if g is not None:
                    part = part * shaped(scale_vec(s_ref, g))
                    if has_offsets:
                        xsum = jnp.sum(x.astype(jnp.float32), axis=1)
                        part = part + shaped(scale_vec(m_ref, g)) * (xsum[None, :] if mode == "dot_swap"
                                                                     else xsum[:, None])
                acc[0] = acc[0] + part
        return tuple(acc)

    if mode == "reduce":
        init = tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(rows))
    else:
        init = (jnp.zeros((block_n, rows) if mode == "dot_swap" else (rows, block_n), jnp.float32),)
    acc = lax.fori_loop(0, steps, body, init)
    if per_channel:
        scale = scale_vec(s_ref, 0)
        acc = tuple(a * (scale if mode == "reduce" else shaped(scale)) for a in acc)
    if mode == "reduce":
        for r in range(rows):
            y = acc[r].astype(o_ref.dtype) if split_k == 1 else acc[r]
            if split_k == 1:
                o_ref[t0 + r, pl.ds(n0, block_n)] = y
            else:
                o_ref[s, t0 + r, pl.ds(n0, block_n)] = y
        return
    acc = acc[0]
    if split_k == 1:
        tile = o_ref.at[pl.ds(t0, rows), pl.ds(n0, block_n)]
        acc = acc.astype(o_ref.dtype)
    else:
        tile = o_ref.at[s, pl.ds(t0, rows), pl.ds(n0, block_n)]
    y = acc.T if mode == "dot_swap" else acc
    if masked:
        ok = (t0 + lax.broadcasted_iota(jnp.int32, (rows, block_n), 0)) < num_tokens
        plgpu.store(tile, y, mask=ok)
    else:
        tile[...] = y


MODES = ("dot_swap", "dot", "reduce")
REDUCE_MAX_TOKENS = 4  # the reduction's work grows with tokens; past a few a dot is cheaper


def default_mode(num_tokens: int, layout: QuantLayout, block_sizes: GpuMatmulBlockSizes) -> str:
    """CUDA cores for int4 and fp8 at one token (measured faster on the H200: the widened codes
    feed FMAs directly, no tensor-core operand shuffle), tensor cores otherwise."""
    if num_tokens == 1 and layout.kind in ("int4", "fp8"):
        return "reduce"
    return "dot_swap" if block_sizes.swap_ab else "dot"


def validate_block_sizes(bs: GpuMatmulBlockSizes, layout: QuantLayout, k: int, n: int) -> None:
    if n % bs.block_n:
        raise ValueError(f"n = {n} must be a multiple of block_n = {bs.block_n}")
    unit = row_unit(layout, k)
    if bs.block_k % unit:
        raise ValueError(f"block_k = {bs.block_k} must be a multiple of {unit} for {layout}")
    if k % (bs.block_k * bs.split_k):
        raise ValueError(f"k = {k} must be a multiple of block_k * split_k = {bs.block_k * bs.split_k}")


@functools.partial(jax.jit, static_argnames=("layout", "block_sizes", "mode", "interpret"))
def quantized_matmul(x, values, scales, offsets=None, layer=None, *, layout: QuantLayout,
                     block_sizes: GpuMatmulBlockSizes | None = None, mode: str | None = None,
                     interpret: bool = False):
    """y = x @ W (or x @ W[layer] for stacked arrays), W quantized as `layout` says.

    Args:
      x: [T, K] activations, float32, bfloat16 or float16; tuned for T <= 64.
      values, scales, offsets: the weight (layout.py), stacked [L, ...] or not; a stack is
        passed whole and only layer `layer`'s bytes are read.
      layer: int32 scalar, required iff the arrays are stacked; may be traced; clamped.
      layout: the weight's QuantLayout.
      block_sizes: tiling (block_k a multiple of the layout's row unit); default: a heuristic.
      mode: "reduce" (CUDA cores; at most REDUCE_MAX_TOKENS tokens), "dot_swap" or "dot"
        (tensor cores, the tile product taken as W^T x^T or x W); default: `default_mode`.
      interpret: Pallas interpret mode (CPU tests).
    Returns:
      [T, N] in x.dtype, accumulated in float32.
    """
    k, n = layout.check(values, scales, offsets)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [num_tokens, {k}], got shape {x.shape}")
    if (values.ndim == 3) != (layer is not None):
        raise ValueError("layer is required for stacked [num_layers, ...] arrays, and only for them")
    num_tokens = x.shape[0]
    per_channel = layout.group_size == k
    if per_channel and offsets is not None:
        raise ValueError("per-channel scales take no offsets")
    if block_sizes is None:
        block_sizes = quantized_block_sizes(num_tokens=num_tokens, k=k, n=n, layout=layout,
                                            device_kind="interpret" if interpret else None)
    validate_block_sizes(block_sizes, layout, k, n)
    bs = block_sizes
    mode = mode or default_mode(num_tokens, layout, bs)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "reduce" and num_tokens > REDUCE_MAX_TOKENS:
        raise ValueError(f"mode 'reduce' takes at most {REDUCE_MAX_TOKENS} tokens, got {num_tokens}")
    rows = num_tokens if mode == "reduce" else rows_per_program(num_tokens)
    kernel = functools.partial(
        _kernel, layout=layout, mode=mode, num_tokens=num_tokens, rows=rows, block_n=bs.block_n, block_k=bs.block_k,
        steps=k // (bs.block_k * bs.split_k), split_k=bs.split_k, stacked=layer is not None,
        has_offsets=offsets is not None, per_channel=per_channel)
    operands = [x, values, scales] + ([offsets] if offsets is not None else [])
    if layer is not None:
        operands.insert(0, jnp.asarray(layer, jnp.int32).reshape(1))

    return weight_stream_call(kernel, operands, grid=(pl.cdiv(num_tokens, rows), n // bs.block_n, bs.split_k),
                              num_tokens=num_tokens, n=n, dtype=x.dtype, block_sizes=bs, interpret=interpret,
                              name=f"quantized_matmul_{layout.kind}")
