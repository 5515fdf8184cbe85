"""Quantized skinny matmul: the storage layout and reference against float64 NumPy built from
the layout's definition, then the GPU kernel (Pallas Triton) against the reference in
interpret mode on any backend and compiled where a GPU exists.

Stacked weights poison the layers the kernel must not read (NaN scales), with the layer
index traced. Cases cover every kind, per-channel and grouped scales, offsets, GGUF's int4
block shapes (Q4_0/Q4_1: pack 32, groups 32; Q4_K: pack 64, groups 32), split-K and token
counts past one token block.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matmul import GpuMatmulBlockSizes
from pallas_kernels.quantized_matmul import (QuantLayout, dequantize, pack_int4, quantized_matmul,
                                             quantized_matmul_reference, unpack_int4)
from pallas_kernels.quantized_matmul.tuned_block_sizes import kernel_supports, quantized_block_sizes
from tests.test_paged_attention import lower_for

TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 1.5e-2}


def numpy_weight(rng, layout: QuantLayout, k: int, n: int, offsets: bool):
    """(values, scales, offsets, float64 weight): codes drawn at random and packed by the
    layout's definition, written here in NumPy independently of pack_int4."""
    g = layout.group_size
    scales = rng.uniform(0.5, 1.5, (k // g, n)).astype(np.float32)
    offs = rng.standard_normal((k // g, n)).astype(np.float32) if offsets else None
    s64 = np.repeat(scales.astype(np.float64), g, axis=0)
    m64 = np.repeat(offs.astype(np.float64), g, axis=0) if offsets else 0.0
    if layout.kind == "int8":
        q = rng.integers(-127, 128, (k, n)).astype(np.int8)
        return q, scales, offs, q.astype(np.float64) * s64 + m64
    if layout.kind == "fp8":
        f = np.asarray(jnp.asarray(rng.standard_normal((k, n)) * 8, jnp.float8_e4m3fn))
        return f, scales, None, f.astype(np.float64) * s64
    u = rng.integers(0, 16, (k, n)).astype(np.uint8)
    p = layout.pack_size
    packed = np.zeros((k // 2, n), np.uint8)
    for b in range(k // p):
        for i in range(p // 2):
            packed[b * p // 2 + i] = u[b * p + i] | (u[b * p + p // 2 + i] << 4)
    w = (u.astype(np.float64) * s64 + m64) if offsets else (u.astype(np.float64) - 8) * s64
    return packed, scales, offs, w


def as_jnp(values, scales, offsets, dtype):
    return (jnp.asarray(values), jnp.asarray(scales, dtype),
            None if offsets is None else jnp.asarray(offsets, dtype))


def assert_close(out, ref, dtype):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out)), "kernel output has NaN or inf"
    err = float(np.max(np.abs(out - ref))) / max(float(np.max(np.abs(ref))), 1e-6)
    assert err <= TOLERANCE[jnp.dtype(dtype)], f"max error {err:.3g} relative to max |ref|"


@dataclasses.dataclass(frozen=True)
class QCase:
    layout: QuantLayout
    k: int
    n: int
    offsets: bool = False
    dtype: object = jnp.float32
    block_sizes: GpuMatmulBlockSizes | None = None
    tokens: tuple[int, ...] = (1, 17)

    def __str__(self):
        lay = self.layout
        return (f"{lay.kind}-g{lay.group_size}-p{lay.pack_size}-{self.k}x{self.n}-off{int(self.offsets)}-"
                f"{jnp.dtype(self.dtype).name}-{self.block_sizes}")


CASES = [
    QCase(QuantLayout("int8", 128), 128, 64),                                       # per channel
    QCase(QuantLayout("int8", 32), 128, 48, offsets=True,
          block_sizes=GpuMatmulBlockSizes(16, 64, split_k=2)),                       # Q8_0-like groups
    QCase(QuantLayout("fp8", 256), 256, 64, dtype=jnp.bfloat16),
    QCase(QuantLayout("int4", 128, 128), 256, 64, block_sizes=GpuMatmulBlockSizes(32, 128, split_k=2)),
    QCase(QuantLayout("int4", 32, 32), 128, 64, offsets=True),                       # Q4_1 blocks
    QCase(QuantLayout("int4", 32, 64), 256, 32, offsets=True, dtype=jnp.bfloat16,
          tokens=(3, 64, 100)),                                                       # Q4_K blocks
    QCase(QuantLayout("int4", 64, 64), 576, 64, offsets=True),                       # SmolLM2's width
]


class TestLayout:
    """The layout's reference pieces against NumPy float64 built from its definition."""

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_dequantize_matches_the_definition(self, case):
        rng = np.random.default_rng(zlib.crc32(str(case).encode()))
        values, scales, offsets, w64 = numpy_weight(rng, case.layout, case.k, case.n, case.offsets)
        out = dequantize(*as_jnp(values, scales, offsets, jnp.float32), case.layout)
        np.testing.assert_allclose(np.asarray(out), w64, rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("pack", [32, 64, 128])
    def test_pack_unpack_round_trip(self, pack):
        codes = jnp.asarray(np.random.default_rng(pack).integers(0, 16, (3, 256, 16)), jnp.uint8)
        packed = pack_int4(codes, pack)
        assert packed.shape == (3, 128, 16)
        np.testing.assert_array_equal(np.asarray(unpack_int4(packed, pack)), np.asarray(codes))

    @pytest.mark.parametrize("case", CASES[:5], ids=str)
    def test_reference_matches_float64(self, case):
        rng = np.random.default_rng(7)
        values, scales, offsets, w64 = numpy_weight(rng, case.layout, case.k, case.n, case.offsets)
        x = rng.standard_normal((5, case.k)).astype(np.float32)
        out = quantized_matmul_reference(jnp.asarray(x), *as_jnp(values, scales, offsets, jnp.float32),
                                         layout=case.layout)
        ref = x.astype(np.float64) @ w64
        assert np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)) < 1e-5

    @pytest.mark.parametrize("make, message", [
        (lambda: QuantLayout("int3", 32), "kind"),
        (lambda: QuantLayout("int4", 32, 0), "pack_size"),
        (lambda: QuantLayout("int4", 48, 64), "whole groups"),
        (lambda: QuantLayout("int8", 32, 32), "int4 only"),
        (lambda: QuantLayout("int8", 0), "group_size"),
    ])
    def test_bad_layouts_are_refused(self, make, message):
        with pytest.raises(ValueError, match=message):
            make()

    def test_mismatched_arrays_are_refused(self):
        lay = QuantLayout("int8", 32)
        v = jnp.zeros((64, 16), jnp.int8)
        with pytest.raises(ValueError, match="scales must have shape"):
            lay.check(v, jnp.zeros((1, 16)), None)
        with pytest.raises(ValueError, match="must be int8"):
            lay.check(v.astype(jnp.uint8), jnp.zeros((2, 16)), None)


class QuantizedMatmulTests:
    INTERPRET: bool

    def matmul(self, x, values, scales, offsets, layer=None, *, layout, block_sizes=None, mode=None):
        return quantized_matmul(x, values, scales, offsets, layer, layout=layout, block_sizes=block_sizes,
                                mode=mode, interpret=self.INTERPRET)

    @pytest.mark.parametrize("mode", ["dot_swap", "dot", "reduce"])
    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_reference(self, case, mode):
        rng = np.random.default_rng(zlib.crc32(str(case).encode()))
        arrays = as_jnp(*numpy_weight(rng, case.layout, case.k, case.n, case.offsets)[:3], case.dtype)
        tokens = (1, 3) if mode == "reduce" else case.tokens
        for t in tokens:
            x = jnp.asarray(rng.standard_normal((t, case.k)), case.dtype)
            out = self.matmul(x, *arrays, layout=case.layout, block_sizes=case.block_sizes, mode=mode)
            assert out.shape == (t, case.n) and out.dtype == case.dtype
            assert_close(out, quantized_matmul_reference(x, *arrays, layout=case.layout), case.dtype)

    @pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=str)
    def test_stacked_layer_traced_with_poisoned_neighbours(self, case):
        """Layer 1 of 3 chosen by a traced index; layers 0 and 2 have NaN scales and offsets."""
        rng = np.random.default_rng(3)
        layers = [numpy_weight(rng, case.layout, case.k, case.n, case.offsets)[:3] for _ in range(3)]
        values = jnp.stack([jnp.asarray(l[0]) for l in layers])
        scales = np.stack([l[1] for l in layers])
        scales[[0, 2]] = np.nan
        offsets = None
        if case.offsets:
            offsets = np.stack([l[2] for l in layers])
            offsets[[0, 2]] = np.nan
            offsets = jnp.asarray(offsets, case.dtype)
        scales = jnp.asarray(scales, case.dtype)
        x = jnp.asarray(rng.standard_normal((4, case.k)), case.dtype)
        ref = quantized_matmul_reference(x, values[1], scales[1], None if offsets is None else offsets[1],
                                         layout=case.layout)
        for mode in ("dot_swap", "reduce"):
            fn = jax.jit(lambda x, layer: self.matmul(x, values, scales, offsets, layer, layout=case.layout,
                                                      block_sizes=case.block_sizes, mode=mode))
            assert_close(fn(x, jnp.int32(1)), ref, case.dtype)


class TestQuantizedMatmulInterpret(QuantizedMatmulTests):
    INTERPRET = True


if jax.default_backend() == "gpu":
    class TestQuantizedMatmul(QuantizedMatmulTests):
        INTERPRET = False


class TestTiling:
    @pytest.mark.parametrize("layout, k, n", [
        (QuantLayout("int8", 4096), 4096, 6144), (QuantLayout("int4", 128, 128), 14336, 4096),
        (QuantLayout("int8", 14336), 14336, 4096), (QuantLayout("fp8", 14336), 14336, 4096),  # down: K not 2^n
        (QuantLayout("fp8", 4096), 4096, 28672), (QuantLayout("int4", 32, 64), 4096, 4096),
        (QuantLayout("int4", 64, 64), 576, 1536), (QuantLayout("int8", 32), 576, 192)])
    def test_heuristic_gives_valid_tilings_that_fill_the_h200(self, layout, k, n):
        assert kernel_supports(layout, k, n)
        for tokens in (1, 16, 64):
            bs = quantized_block_sizes(num_tokens=tokens, k=k, n=n, layout=layout, device_kind="NVIDIA H200")
            unit = layout.pack_size if layout.kind == "int4" else (layout.group_size if layout.group_size < k else 16)
            assert n % bs.block_n == 0 and bs.block_k % unit == 0 and k % (bs.block_k * bs.split_k) == 0
            programs = n // bs.block_n * bs.split_k
            assert programs >= 264 or bs.split_k == max(
                s for s in range(1, 17) if (k // bs.block_k) % s == 0), (bs, programs)

    def test_shallow_groups_are_left_to_xla(self):
        assert not kernel_supports(QuantLayout("int8", 8), 64, 64)
        assert not kernel_supports(QuantLayout("int4", 16, 16), 64, 64)  # 8-deep dots
        assert not kernel_supports(QuantLayout("int4", 96, 96), 576, 64)  # 48-row tiles

    def test_lowers_to_triton_reading_the_stack_whole(self):
        s = jax.ShapeDtypeStruct
        layout = QuantLayout("int4", 128, 128)
        text = lower_for("cuda", lambda x, v, sc, m, layer: quantized_matmul(x, v, sc, m, layer, layout=layout),
                         s((1, 4096), jnp.bfloat16), s((32, 2048, 28672), jnp.uint8),
                         s((32, 32, 28672), jnp.bfloat16), s((32, 32, 28672), jnp.bfloat16), s((), jnp.int32))
        assert "__gpu$xla.gpu.triton" in text
        assert "stablehlo.dynamic_slice" not in text
