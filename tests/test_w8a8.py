"""W8A8 skinny matmul: the reference against a float64 NumPy model written from the format's
definition (per token: s = max|x| / top, codes rounded half up for int8, cast to e4m3 for
fp8), then the GPU kernel (Pallas Triton) against the reference in
interpret mode on any backend and compiled where a GPU exists. Stacked weights poison the
layers the kernel must not read (NaN scales), with the layer index traced."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matmul import GpuMatmulBlockSizes
from pallas_kernels.quantized_matmul.w8a8 import fake_quantize_activations, w8a8_matmul, w8a8_reference

TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 1.5e-2}
TOPS = {"int8": 127.0, "fp8": 448.0}


def numpy_codes(rng, kind, k, n):
    if kind == "int8":
        return rng.integers(-127, 128, (k, n)).astype(np.int8)
    return np.asarray(jnp.asarray(rng.standard_normal((k, n)) * 8, jnp.float8_e4m3fn))


def numpy_fake_quantize(x, kind):
    """float64 model of the activation format (e4m3 rounding taken from ml_dtypes' cast)."""
    x = np.asarray(x, np.float64)
    amax = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-30)
    top = TOPS[kind]
    v = x * (top / amax)
    if kind == "int8":
        q = np.clip(np.floor(v + 0.5), -top, top)
    else:
        q = np.clip(v, -top, top).astype(jnp.float8_e4m3fn).astype(np.float64)
    return q * (amax / top)


def assert_close(out, ref, dtype, tol=None):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out)), "kernel output has NaN or inf"
    err = float(np.max(np.abs(out - ref))) / max(float(np.max(np.abs(ref))), 1e-6)
    assert err <= (tol or TOLERANCE[jnp.dtype(dtype)]), f"max error {err:.3g} relative to max |ref|"


class TestReference:
    @pytest.mark.parametrize("kind", ["int8", "fp8"])
    def test_fake_quantize_matches_float64(self, kind):
        rng = np.random.default_rng(1)
        x = rng.standard_normal((5, 256)).astype(np.float32) * rng.uniform(0.1, 10, (5, 1)).astype(np.float32)
        x[2] = 0.0  # an all-zero row quantizes to zeros, not NaN
        got = np.asarray(fake_quantize_activations(jnp.asarray(x), kind), np.float64)
        want = numpy_fake_quantize(x, kind)
        # Only a value on a rounding boundary can differ (float32 vs float64 scaling): one code step.
        step = np.broadcast_to(np.abs(x).max(-1, keepdims=True) / TOPS[kind], x.shape)
        if kind == "fp8":
            step = step * 32  # e4m3's widest step (2^5 at the top binade) in units of s
        slack = 1e-6 * np.abs(want)  # float32 against float64 products
        assert np.all(np.abs(got - want) <= step * 1.001 + slack)
        assert np.mean(np.abs(got - want) <= slack) > 0.99
        assert np.all(got[2] == 0)

    @pytest.mark.parametrize("kind", ["int8", "fp8"])
    def test_reference_matches_float64(self, kind):
        rng = np.random.default_rng(2)
        k, n = 256, 48
        codes = numpy_codes(rng, kind, k, n)
        scales = rng.uniform(0.5, 1.5, (1, n)).astype(np.float32)
        x = rng.standard_normal((3, k)).astype(np.float32)
        got = w8a8_reference(jnp.asarray(x), jnp.asarray(codes.T.copy()), jnp.asarray(scales), kind=kind)
        want = numpy_fake_quantize(x, kind) @ (codes.astype(np.float64) * scales)
        assert_close(got, want, jnp.float32, tol=1e-4)


CASES = [  # (kind, k, n, dtype, tiling)
    ("int8", 256, 64, jnp.float32, None),
    ("int8", 512, 128, jnp.bfloat16, GpuMatmulBlockSizes(64, 256, split_k=2)),
    ("fp8", 256, 64, jnp.bfloat16, GpuMatmulBlockSizes(32, 128, split_k=2)),
    ("fp8", 576, 32, jnp.float32, GpuMatmulBlockSizes(16, 64, split_k=3)),  # SmolLM2's width
]


class W8A8Tests:
    INTERPRET: bool

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_reference(self, case):
        kind, k, n, dtype, bs = case
        rng = np.random.default_rng(zlib.crc32(str(case).encode()))
        codes = numpy_codes(rng, kind, k, n)
        values = jnp.asarray(codes.T.copy())  # stored [N, K]
        scales = jnp.asarray(rng.uniform(0.5, 1.5, (1, n)), dtype)
        for t in (1, 5, 17):
            x = jnp.asarray(rng.standard_normal((t, k)), dtype)
            out = w8a8_matmul(x, values, scales, kind=kind, block_sizes=bs, interpret=self.INTERPRET)
            assert out.shape == (t, n) and out.dtype == dtype
            assert_close(out, w8a8_reference(x, values, scales, kind=kind), dtype)

    @pytest.mark.parametrize("kind", ["int8", "fp8"])
    def test_stacked_layer_traced_with_poisoned_neighbours(self, kind):
        rng = np.random.default_rng(3)
        k, n = 256, 64
        values = jnp.stack([jnp.asarray(numpy_codes(rng, kind, k, n).T.copy()) for _ in range(3)])
        scales = rng.uniform(0.5, 1.5, (3, 1, n)).astype(np.float32)
        scales[[0, 2]] = np.nan
        scales = jnp.asarray(scales)
        x = jnp.asarray(rng.standard_normal((4, k)), jnp.float32)
        fn = jax.jit(lambda x, layer: w8a8_matmul(x, values, scales, layer, kind=kind,
                                                  block_sizes=GpuMatmulBlockSizes(32, 128, split_k=2),
                                                  interpret=self.INTERPRET))
        ref = w8a8_reference(x, values[1], scales[1], kind=kind)
        assert_close(fn(x, jnp.int32(1)), ref, jnp.float32)

    def test_bad_inputs_are_refused(self):
        v = jnp.zeros((64, 32), jnp.int8)
        with pytest.raises(ValueError, match="one per output channel"):
            w8a8_matmul(jnp.zeros((1, 32)), v, jnp.ones((2, 64)), kind="int8",
                        interpret=self.INTERPRET)
        with pytest.raises(ValueError, match="codes must be"):
            w8a8_matmul(jnp.zeros((1, 32)), v.astype(jnp.uint8), jnp.ones((1, 64)), kind="int8",
                        interpret=self.INTERPRET)
        with pytest.raises(ValueError, match="does not fit"):
            w8a8_matmul(jnp.zeros((1, 32)), v, jnp.ones((1, 64)), kind="int8",
                        block_sizes=GpuMatmulBlockSizes(64, 16, split_k=4), interpret=self.INTERPRET)


class TestW8A8Interpret(W8A8Tests):
    INTERPRET = True


if jax.default_backend() == "gpu":
    class TestW8A8(W8A8Tests):
        INTERPRET = False
