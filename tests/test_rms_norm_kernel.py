"""Fused residual add + RMSNorm: the reference against float64 numpy, then the GPU kernel
(Pallas Triton) against the reference, in interpret mode on any backend and compiled where a
GPU exists. Stacked norm weights are NaN in every layer but the selected one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels.rms_norm import RmsNormBlockSizes, add_rms_norm, add_rms_norm_reference, rms_norm_block_sizes
from tests.test_paged_attention import lower_for

EPS = 1e-5
# bf16 outputs may round one ulp apart (the partials are summed in another order).
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1.6e-2}


def close(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    err = np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-6)
    assert err <= TOLERANCE[jnp.dtype(dtype)], f"relative error {err:.3g}"


def numpy_add_norm(y, residual, weight, kind):
    y64 = np.asarray(y, np.float64)
    y64 = y64.sum(0) if y64.ndim == 3 else y64
    x = np.asarray(residual, np.float64) + y64
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    w = np.asarray(weight, np.float64)
    return x, h * ((1 + w) if kind == "gemma" else w)


def inputs(rng, t, d, splits, dtype, layers=3, layer=1):
    shape = (splits, t, d) if splits else (t, d)
    y = jnp.asarray(rng.standard_normal(shape), jnp.float32 if splits else dtype)
    residual = jnp.asarray(rng.standard_normal((t, d)) * 2, dtype)
    w = np.full((layers, d), np.nan, np.float32)
    w[layer] = rng.standard_normal(d)
    return y, residual, jnp.asarray(w, dtype)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_reference_matches_float64(kind):
    rng = np.random.default_rng(0)
    y, residual, w = inputs(rng, 5, 96, 3, jnp.float32)
    x, out = add_rms_norm_reference(y, residual, w, jnp.int32(1), eps=EPS, kind=kind)
    x64, out64 = numpy_add_norm(y, residual, w[1], kind)
    np.testing.assert_allclose(np.asarray(x), x64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), out64, rtol=1e-4, atol=1e-5)


class AddNormTests:
    INTERPRET: bool

    @pytest.mark.parametrize("kind", ["llama", "gemma"])
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("t, d, splits, block_sizes", [
        (1, 64, None, None),                                 # one chunk, a finished product
        (3, 64, 7, None),                                    # one chunk, seven partials
        (2, 576, 3, None),                                   # nine chunks of 64 (576 = 9 * 64)
        (4, 256, 1, RmsNormBlockSizes(chunk=32, num_warps=4)),
    ])
    def test_matches_reference(self, kind, dtype, t, d, splits, block_sizes):
        rng = np.random.default_rng(t * d + (splits or 0))
        y, residual, w = inputs(rng, t, d, splits, dtype)
        fn = jax.jit(lambda y, r, w, i: add_rms_norm(y, r, w, i, eps=EPS, kind=kind, block_sizes=block_sizes,
                                                     interpret=self.INTERPRET))
        x, out = fn(y, residual, w, jnp.int32(1))
        x_ref, out_ref = add_rms_norm_reference(y, residual, w, jnp.int32(1), eps=EPS, kind=kind)
        assert x.dtype == out.dtype == dtype and x.shape == out.shape == (t, d)
        close(x, x_ref, dtype)
        close(out, out_ref, dtype)

    def test_unstacked_weight_and_layers_in_a_loop(self):
        rng = np.random.default_rng(9)
        y, residual, w = inputs(rng, 2, 128, 2, jnp.float32, layers=4, layer=3)
        w = w.at[1].set(jnp.asarray(rng.standard_normal(128), jnp.float32))

        @jax.jit
        def two_layers(y, r, w):  # layers 1 and 3 chosen by the loop counter; 0 and 2 are NaN
            def body(i, r):
                return add_rms_norm(y, r, w, 2 * i + 1, eps=EPS, interpret=self.INTERPRET)[1]
            return lax.fori_loop(0, 2, body, r)

        ref = residual
        for i in (1, 3):
            ref = add_rms_norm_reference(y, ref, w[i], eps=EPS)[1]
        close(two_layers(y, residual, w), ref, jnp.float32)


class TestAddNormInterpret(AddNormTests):
    INTERPRET = True


if jax.default_backend() == "gpu":
    class TestAddNormGpu(AddNormTests):
        INTERPRET = False


def test_lowers_to_triton_reading_the_stack_whole():
    s = jax.ShapeDtypeStruct
    text = lower_for("cuda", lambda y, r, w, i: add_rms_norm(y, r, w, i, eps=EPS),
                     s((4, 16, 4096), jnp.float32), s((16, 4096), jnp.bfloat16), s((32, 4096), jnp.bfloat16),
                     s((), jnp.int32))
    assert "__gpu$xla.gpu.triton" in text
    assert "stablehlo.dynamic_slice" not in text


def test_block_sizes_follow_the_width():
    assert rms_norm_block_sizes(4096) == RmsNormBlockSizes(4096, 32)
    assert rms_norm_block_sizes(8192).chunk == 4096
    assert rms_norm_block_sizes(576).chunk == 64 and rms_norm_block_sizes(3584).chunk == 512
    assert rms_norm_block_sizes(1000) is None  # 8 * 125: too small a chunk


@pytest.mark.parametrize("make, message", [
    (lambda y, r, w: (y, r, w, None, "llama"), "pass the layer index"),
    (lambda y, r, w: (y, r, w[0], 0, "llama"), "only for a stacked weight"),
    (lambda y, r, w: (y[:, :, :32], r, w, 0, "llama"), "y must be"),
    (lambda y, r, w: (y.astype(jnp.bfloat16), r, w, 0, "llama"), "partials must be float32"),
    (lambda y, r, w: (y, r, w[:, :32], 0, "llama"), "weight must be"),
    (lambda y, r, w: (y, r[0], w, 0, "llama"), "residual must be"),
    (lambda y, r, w: (y, r, w, 0, "rms"), "kind must be"),
])
@pytest.mark.parametrize("fn", [add_rms_norm, add_rms_norm_reference])
def test_rejects_bad_inputs(fn, make, message):
    y, r, w = inputs(np.random.default_rng(0), 2, 64, 2, jnp.float32)
    *args, kind = make(y, r, w)
    with pytest.raises(ValueError, match=message):
        fn(*args, eps=EPS, kind=kind)
