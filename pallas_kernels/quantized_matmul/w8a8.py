"""Skinny matmul with 8-bit weights *and* 8-bit activations (W8A8) on GPUs: the products run on
the tensor cores' native int8 or fp8 instructions, so the weight tile goes from memory to the
dot as it is stored, with nothing widened in registers.

Why: the weight-only kernel (gpu.py) widens each code to bf16 before its dot. Triton then loads
the tile synchronously into registers instead of pipelining it through shared memory, and the
widening costs ALU time per byte; it reads 1.9-2.4 TB/s of codes on an H200 where the bf16
kernel reads 4 (benchmarks/NOTES.md).

Activations are quantized per token (vLLM's and SGLang's dynamic W8A8): s = max|x| / top
(top = 127 for int8, 448 for e4m3), q = x / s rounded (int8: floor(v + 0.5), clipped to
+-127; fp8: the cast's rounding). `quantize_activations` does that once per projection, in
XLA (one small fusion over [T, K]); the kernel then streams the weight exactly as the dense
kernel does and scales its integer (or fp8) sums by s_token * s_channel in the epilogue. The
reference is the fake-quantized x_hat = q * s times the weight-only product.

Weights: codes int8 or float8_e4m3fn stored [N, K] (K-major: the layout Hopper's 8-bit
tensor-core instructions read from shared memory; the same kernel over codes stored [K, N] took
2.2-4.5x as long on the H200, benchmarks/results/quantized_matmul_h200_2026-12-02_w8a8_int8_sweep
rows "pallas_kn", since removed), per-channel scales [1, N]; stacked [L, ...] with a traced
layer index read in place, as the weight-only kernel.
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
from pallas_kernels.quantized_matmul.layout import select_layer
from pallas_kernels.quantized_matmul.tuned_block_sizes import programs_to_fill, split_to_fill

ACT_KINDS = ("int8", "fp8")
CODE_DTYPES = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn)}
TOPS = {"int8": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}
# The smallest max|x| a row is scaled by: top / it stays finite in float32 (an all-zero row
# quantizes to zeros, not 0 * inf).
MIN_AMAX = 1e-30


def quantize_activations(x, kind: str):
    """(codes [T, K] in the kind's dtype, float32 scales [T]): per-token dynamic quantization,
    in XLA; the kernel, XLA's 8-bit dot and the reference all take their codes from here."""
    x32 = x.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1), MIN_AMAX)
    top = TOPS[kind]
    v = x32 * (top / amax)[:, None]
    q = jnp.clip(jnp.floor(v + 0.5) if kind == "int8" else v, -top, top)
    return q.astype(CODE_DTYPES[kind]), amax / top


def fake_quantize_activations(x, kind: str):
    """x_hat = q * s per token, in float32: what the kernel's products see."""
    q, s = quantize_activations(x, kind)
    return q.astype(jnp.float32) * s[:, None]


def w8a8_reference(x, values, scales, layer=None, *, kind: str):
    """fake_quantize(x) @ (codes [N, K]^T * per-channel scale) in float32 with exact float32
    products."""
    codes = select_layer(values, layer).astype(jnp.float32).T
    y = jnp.dot(fake_quantize_activations(x, kind), codes, precision=lax.Precision.HIGHEST)
    return (y * select_layer(scales, layer).astype(jnp.float32)[0]).astype(x.dtype)


def _kernel(*refs, kind, num_tokens, rows, block_n, block_k, steps, split_k, stacked):
    refs = list(refs)
    layer_ref = refs.pop(0) if stacked else None
    q_ref, xs_ref, v_ref, s_ref, o_ref = refs
    lead = (jnp.clip(layer_ref[0], 0, v_ref.shape[0] - 1),) if stacked else ()
    t, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t0 = t * rows
    n0 = pl.multiple_of(j * block_n, block_n)
    k_base = s * (steps * block_k)
    masked = num_tokens % rows != 0
    acc_dtype = jnp.int32 if kind == "int8" else jnp.float32

    def body(i, acc):
        k0 = pl.multiple_of(k_base + i * block_k, block_k)
        q_tile = q_ref.at[pl.ds(t0, rows), pl.ds(k0, block_k)]
        if masked:
            ok = (t0 + lax.broadcasted_iota(jnp.int32, (rows, block_k), 0)) < num_tokens
            # Rows past the tokens only ever meet their own output rows, which are not stored,
            # so fp8 loads them undefined (Triton has no fp8 fill constant).
            q = plgpu.load(q_tile, mask=ok, other=0 if kind == "int8" else None)
        else:
            q = q_tile[...]  # [rows, block_k]
        w = v_ref[(*lead, pl.ds(n0, block_n), pl.ds(k0, block_k))]  # [block_n, block_k], K contiguous
        return acc + lax.dot_general(w, q, (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype)  # [block_n, rows]

    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_n, rows), acc_dtype)).astype(jnp.float32)
    if masked:
        x_scale = plgpu.load(xs_ref.at[pl.ds(t0, rows)], mask=(t0 + lax.iota(jnp.int32, rows)) < num_tokens, other=0)
    else:
        x_scale = xs_ref[pl.ds(t0, rows)]
    acc = acc * s_ref[(*lead, 0, pl.ds(n0, block_n))].astype(jnp.float32)[:, None] * x_scale[None, :]
    if split_k == 1:
        tile = o_ref.at[pl.ds(t0, rows), pl.ds(n0, block_n)]
        acc = acc.astype(o_ref.dtype)
    else:
        tile = o_ref.at[s, pl.ds(t0, rows), pl.ds(n0, block_n)]
    y = acc.T
    if masked:
        ok = (t0 + lax.broadcasted_iota(jnp.int32, (rows, block_n), 0)) < num_tokens
        plgpu.store(tile, y, mask=ok)
    else:
        tile[...] = y


def check_weight(values, scales, kind: str) -> tuple[int, int]:
    """Static checks; returns the logical (k, n)."""
    if kind not in ACT_KINDS:
        raise ValueError(f"W8A8 kind must be one of {ACT_KINDS}, got {kind!r}")
    if values.ndim not in (2, 3):
        raise ValueError(f"values must be [n, k] or stacked [num_layers, n, k], got shape {values.shape}")
    if jnp.dtype(values.dtype) != CODE_DTYPES[kind]:
        raise ValueError(f"{kind} codes must be {CODE_DTYPES[kind]}, got {values.dtype}")
    n, k = values.shape[-2:]
    expected = (*values.shape[:-2], 1, n)
    if tuple(scales.shape) != expected:
        raise ValueError(f"scales must have shape {expected} (one per output channel), got {scales.shape}")
    return k, n


def default_block_sizes(num_tokens: int, k: int, n: int, device_kind: str | None = None) -> GpuMatmulBlockSizes:
    """128-column strips, 128-row steps, K split until about two programs per multiprocessor
    run (as the weight-only kernel's tiling). Not tuned per shape yet: the H200 sweep's best
    tilings differ per shape (benchmarks/results/quantized_matmul_h200_2026-12-02_w8a8_*)."""
    block_n = next(b for b in (128, 64, 32, 16) if n % b == 0)
    block_k = next(b for b in (128, 64, 32, 16) if k % b == 0)
    split_k = split_to_fill(k // block_k, n // block_n, programs_to_fill(device_kind))
    return GpuMatmulBlockSizes(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4,
                               num_stages=4, swap_ab=True)


def kernel_supports(k: int, n: int) -> bool:
    """Whether the kernel tiles [K, N]: both multiples of 16 (edges are not masked)."""
    return k % 16 == 0 and n % 16 == 0


@functools.partial(jax.jit, static_argnames=("kind", "block_sizes", "interpret", "out_dtype"))
def w8a8_matmul(x, values, scales, layer=None, *, kind: str, block_sizes: GpuMatmulBlockSizes | None = None,
                interpret: bool = False, out_dtype=None):
    """y = fake_quantize(x) @ W (see the module docstring), W = codes * per-channel scales.

    Args:
      x: [T, K] activations (bfloat16, float16 or float32); tuned for T <= 64.
      values: codes [N, K], int8 or float8_e4m3fn; or stacked [L, N, K].
      scales: [1, N] (or [L, 1, N]) per-channel scales.
      layer: int32 scalar iff stacked; may be traced; clamped.
      kind: "int8" or "fp8" (the activations are quantized to the weight's kind).
      block_sizes: tiling (N a multiple of block_n, K of block_k * split_k).
      interpret: Pallas interpret mode (CPU tests).
      out_dtype: the result's dtype (default x's).
    Returns:
      [T, N], accumulated exactly in int32 (int8) or in float32 (fp8), scaled in float32.
    """
    k, n = check_weight(values, scales, kind)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [num_tokens, {k}], got shape {x.shape}")
    if (values.ndim == 3) != (layer is not None):
        raise ValueError("layer is required for stacked [num_layers, ...] arrays, and only for them")
    if not kernel_supports(k, n):
        raise ValueError(f"the W8A8 kernel needs K and N multiples of 16, got K = {k}, N = {n}")
    num_tokens = x.shape[0]
    bs = block_sizes or default_block_sizes(num_tokens, k, n, "interpret" if interpret else None)
    if n % bs.block_n or k % (bs.block_k * bs.split_k):
        raise ValueError(f"tiling {bs} does not fit K = {k}, N = {n}")
    q, x_scale = quantize_activations(x, kind)
    rows = rows_per_program(num_tokens)
    kernel = functools.partial(
        _kernel, kind=kind, num_tokens=num_tokens, rows=rows, block_n=bs.block_n, block_k=bs.block_k,
        steps=k // (bs.block_k * bs.split_k), split_k=bs.split_k, stacked=layer is not None)
    operands = [q, x_scale, values, scales]
    if layer is not None:
        operands.insert(0, jnp.asarray(layer, jnp.int32).reshape(1))
    return weight_stream_call(kernel, operands, grid=(pl.cdiv(num_tokens, rows), n // bs.block_n, bs.split_k),
                              num_tokens=num_tokens, n=n, dtype=out_dtype or x.dtype, block_sizes=bs,
                              interpret=interpret, name=f"w8a8_matmul_{kind}")
