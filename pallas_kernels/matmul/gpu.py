"""Skinny (decode) matmul on GPUs: y[T, N] = x[T, K] @ w[K, N] for few tokens T, with Pallas
and the Triton lowering. At decode the cost is reading w once from HBM, so the kernel is a
weight stream: every weight byte is loaded exactly once, in wide contiguous row segments,
with several tiles in flight per program.

Grid (token blocks, N / block_n, split_k); the column axis varies fastest, so programs that
run together read neighbouring bytes of the same weight rows. Program (t, j, s) owns output
columns [j * block_n, (j + 1) * block_n) of token rows [t * R, (t + 1) * R) (R = max(16, next
power of 2 of T), at most 64; pad rows are masked on load and store) and walks rows
[s * K / split_k, (s + 1) * K / split_k) of the weight in block_k steps: load a [block_k,
block_n] weight tile and an [R, block_k] x tile, and accumulate their product in float32
(Triton pipelines the loop num_stages deep). With swap_ab the product is taken as
w_tile^T @ x_tile^T -> [block_n, R], so the dot's M side is block_n and Hopper can use wgmma;
it is transposed once at the end. With split_k == 1 the program writes its [R, block_n] tile
of y; with more, each program writes float32 partials [split_k, T, N] that are summed outside
the kernel (XLA fuses that sum into the consumer), or handed on unsummed to a consumer that
sums them itself (pallas_kernels/rms_norm). A gated product (the MLP's act(gate) * up, w's
columns gate | up) loads the gate and up tiles of the same columns side by side and applies
the activation in the epilogue, so neither half reaches memory.

A stacked weight [L, K, N] is passed whole, with the layer index as an int32 [1] operand read
in the kernel and used to offset the weight pointer, so selecting a layer inside jit,
lax.scan or fori_loop never copies w[layer]; only that layer's bytes are read. Edges are not
masked: N must be a multiple of block_n and K of block_k * split_k (the tuned and fallback
tilings always are, for K and N multiples of 16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import check_block_sizes
from pallas_kernels.matmul.reference import GATED_ACTIVATIONS, check_matmul_inputs, gated_product
from pallas_kernels.matmul.tuned_block_sizes import (GpuMatmulBlockSizes, gpu_matmul_block_sizes,
                                                     rows_per_program)


def _dot(a, b, contract):
    # float32 inputs get exact float32 products; Triton's default for them would be TF32.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _skinny_matmul_kernel(*refs, num_tokens, rows, stacked, **tile):
    if stacked:
        layer_ref, x_ref, w_ref, o_ref = refs
        # Clamped like lax.dynamic_index_in_dim, so a bad index is never an address.
        lead = (jnp.clip(layer_ref[0], 0, w_ref.shape[0] - 1),)
    else:
        x_ref, w_ref, o_ref = refs
        lead = ()
    t0 = pl.program_id(0) * rows
    stream_tile(x_ref, w_ref, o_ref, lead=lead, t0=t0, row_end=num_tokens, rows=rows,
                masked=num_tokens % rows != 0, **tile)  # pad rows only in the last token block


def stream_tile(x_ref, w_ref, o_ref, *, lead, t0, row_end, rows, masked, block_n, block_k, steps, split_k,
                swap_ab, activation=None, gate_offset=0, j=None, s=None):
    """One program's work: output columns [j * block_n, +block_n) (j = program_id(1)) of x rows
    [t0, t0 + rows) that are below `row_end` (`masked`: some may not be), from weight rows
    [s * K / split_k, +K / split_k) (s = program_id(2)) of w_ref[lead]. t0 and row_end may be
    traced (the grouped kernel's tiles start anywhere); a caller inside `pl.when` passes j and s
    (interpret mode reads program ids only outside a branch)."""
    j = pl.program_id(1) if j is None else j
    s = pl.program_id(2) if s is None else s
    n0 = pl.multiple_of(j * block_n, block_n)
    k_base = s * (steps * block_k)
    row_ok = (t0 + lax.broadcasted_iota(jnp.int32, (rows, block_k), 0)) < row_end

    def product(x, w):
        return _dot(w, x, ((0,), (1,))) if swap_ab else _dot(x, w, ((1,), (0,)))  # [block_n, rows] / [rows, block_n]

    def body(i, accs):
        k0 = pl.multiple_of(k_base + i * block_k, block_k)
        x_tile = x_ref.at[pl.ds(t0, rows), pl.ds(k0, block_k)]
        x = plgpu.load(x_tile, mask=row_ok, other=0) if masked else x_tile[...]  # [rows, block_k]
        w = w_ref[(*lead, pl.ds(k0, block_k), pl.ds(n0, block_n))]  # [block_k, block_n]
        if activation is None:
            return accs + product(x, w)
        # Gated: the same columns of the up half, gate_offset columns on (w is gate | up).
        w_up = w_ref[(*lead, pl.ds(k0, block_k), pl.ds(n0 + gate_offset, block_n))]
        return accs[0] + product(x, w), accs[1] + product(x, w_up)

    acc_shape = (block_n, rows) if swap_ab else (rows, block_n)
    zeros = jnp.zeros(acc_shape, jnp.float32)
    acc = lax.fori_loop(0, steps, body, zeros if activation is None else (zeros, zeros))
    if activation is not None:
        acc = gated_product(*acc, activation, o_ref.dtype)

    if split_k == 1:
        tile = o_ref.at[pl.ds(t0, rows), pl.ds(n0, block_n)]
        acc = acc.astype(o_ref.dtype)  # before the transpose: half the bytes to shuffle
    else:  # float32 partials, summed outside
        tile = o_ref.at[s, pl.ds(t0, rows), pl.ds(n0, block_n)]
    y = acc.T if swap_ab else acc  # [rows, block_n]
    if masked:
        out_rows = (t0 + lax.broadcasted_iota(jnp.int32, (rows, block_n), 0)) < row_end
        plgpu.store(tile, y, mask=out_rows)
    else:
        tile[...] = y


def validate_block_sizes(block_sizes, k: int, n: int) -> None:
    check_block_sizes(block_sizes, GpuMatmulBlockSizes)
    if n % block_sizes.block_n:
        raise ValueError(f"n = {n} must be a multiple of block_n = {block_sizes.block_n} "
                         "(the kernel does not mask column edges)")
    span = block_sizes.block_k * block_sizes.split_k
    if k % span:
        raise ValueError(f"k = {k} must be a multiple of block_k * split_k = {block_sizes.block_k} * "
                         f"{block_sizes.split_k} = {span} (the kernel does not mask row edges)")


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "activation", "sum_partials"))
def skinny_matmul(x, w, layer=None, *, block_sizes: GpuMatmulBlockSizes | None = None,
                  interpret: bool = False, activation: str | None = None, sum_partials: bool = True):
    """y = x @ w, or x @ w[layer] for a stacked weight, reading each weight byte once (GPU kernel).

    Args:
      x: [T, K] activations; any T, tuned for T <= 64 (more tokens are tiled 64 rows at a time,
        each block re-reading the weight).
      w: [K, N], or [L, K, N] stacked layers passed whole (no copy of w[layer] is made).
        Same dtype as x: float32, bfloat16 or float16.
      layer: int32 scalar, required iff w is stacked; may be traced (jit, lax.scan,
        fori_loop). Out-of-range values are clamped into [0, L - 1].
      block_sizes: tiling; defaults from tuned_block_sizes for this device. N must be a
        multiple of block_n and K of block_k * split_k (edges are not masked).
      interpret: run the kernel in Pallas interpret mode (any backend, e.g. CPU tests).
      activation: "silu" or "gelu_tanh" for a gated product: w's columns are gate | up (N
        even) and the result is act(x @ gate) * (x @ up), [T, N / 2], computed in the kernel's
        epilogue (the tiling must not split K; it is looked up for the whole [K, N]).
      sum_partials: False returns a split-K tiling's float32 partials [split_k, T, N] unsummed,
        for a consumer that sums them itself (pallas_kernels/rms_norm); without a split the
        result is [T, N] either way.
    Returns:
      [T, N] in x.dtype, accumulated in float32 (exact float32 products for float32 inputs).
    """
    num_tokens, k, n, layer = check_matmul_inputs(x, w, layer)
    if block_sizes is None:
        block_sizes = gpu_matmul_block_sizes(num_tokens=num_tokens, k=k, n=n, dtype=x.dtype,
                                             device_kind="interpret" if interpret else None)
    validate_block_sizes(block_sizes, k, n)
    bs = block_sizes
    out_n = n
    if activation is not None:
        if activation not in GATED_ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(GATED_ACTIVATIONS)}, got {activation!r}")
        out_n = n // 2
        if n % 2 or out_n % bs.block_n or bs.split_k != 1:
            raise ValueError(f"a gated product needs an even n whose half is a multiple of block_n and "
                             f"split_k == 1; got n = {n}, {bs}")
    rows = rows_per_program(num_tokens)
    grid = (pl.cdiv(num_tokens, rows), out_n // bs.block_n, bs.split_k)
    kernel = functools.partial(
        _skinny_matmul_kernel, num_tokens=num_tokens, rows=rows, block_n=bs.block_n,
        block_k=bs.block_k, steps=k // (bs.block_k * bs.split_k), split_k=bs.split_k,
        swap_ab=bs.swap_ab, stacked=layer is not None, activation=activation, gate_offset=out_n)

    operands = (x, w) if layer is None else (layer, x, w)
    return weight_stream_call(kernel, operands, grid=grid, num_tokens=num_tokens, n=out_n, dtype=x.dtype,
                              block_sizes=bs, interpret=interpret, name="skinny_matmul",
                              sum_partials=sum_partials)


def gated_block_sizes(*, num_tokens: int, k: int, n: int, dtype, interpret: bool = False):
    """The tiling of x [T, k] @ w [k, n] if it also serves the gated product (no split of K,
    block_n dividing n / 2), else None (the caller multiplies the halves itself)."""
    if n % 2 or k % 16 or n % 32:
        return None
    bs = gpu_matmul_block_sizes(num_tokens=num_tokens, k=k, n=n, dtype=dtype,
                                device_kind="interpret" if interpret else None)
    return bs if bs.split_k == 1 and (n // 2) % bs.block_n == 0 else None


def weight_stream_call(kernel, operands, *, grid, num_tokens: int, n: int, dtype, block_sizes, interpret: bool,
                       name: str, sum_partials: bool = True):
    """The pallas_call of a skinny-matmul kernel (this one or the quantized one): every operand
    passed whole, the output [T, N] in `dtype` or, with split-K, float32 partials [split_k, T,
    N] summed here (XLA fuses the sum into the consumer) unless `sum_partials` is False."""
    bs = block_sizes

    def whole(a):
        return pl.BlockSpec(a.shape, lambda *_, nd=a.ndim: (0,) * nd)

    if bs.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((num_tokens, n), dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((bs.split_k, num_tokens, n), jnp.float32)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole(a) for a in operands],
        out_specs=whole(out_shape),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=name,
    )(*operands)
    if bs.split_k == 1 or not sum_partials:
        return out
    return jnp.sum(out, axis=0).astype(dtype)
