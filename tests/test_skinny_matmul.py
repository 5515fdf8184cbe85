"""Skinny (decode) matmul: the reference against hand-computed and float64 numpy cases, then the
GPU kernel (Pallas Triton) against the reference, in interpret mode on any backend and compiled
where a GPU exists.

Stacked weights are poisoned where the kernel must not look: every layer but the selected
ones is NaN, and the layer index is traced (jit argument, fori_loop counter). Each static
configuration runs over token counts at the dot's padding edges (1, 3, 16, 17, 64) and past
one token block (100).
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels.matmul import GpuMatmulBlockSizes, gpu, skinny_matmul_reference
from pallas_kernels.matmul import tuned_block_sizes as tbs
from tests.test_paged_attention import lower_for

# Max |kernel - reference| / max |reference| per dtype: both accumulate exact products in
# float32 (in another order); 16-bit outputs may then round one ulp apart.
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 2e-3}


def assert_close(out, ref, dtype):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out)), "kernel output has NaN or inf"
    assert np.all(np.isfinite(ref)), "reference output has NaN or inf"
    err = float(np.max(np.abs(out - ref), initial=0.0)) / max(float(np.max(np.abs(ref), initial=0.0)), 1e-6)
    assert err <= TOLERANCE[jnp.dtype(dtype)], f"max error {err:.3g} relative to max |ref|"


def random(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


def poisoned_stack(rng, num_layers, valid, k, n, dtype):
    """[L, K, N] with random layers `valid` and NaN everywhere else."""
    w = np.full((num_layers, k, n), np.nan, np.float32)
    for layer in valid:
        w[layer] = rng.standard_normal((k, n))
    return jnp.asarray(w, dtype)


class TestReference:
    """The reference itself, against cases computed by hand and in float64 numpy."""

    # x = [[1, 2, 3], [0, -1, 0.5]], w = [[1, 0], [0, 1], [2, -1]]:
    # row 0: (1 + 6, 2 - 3) = (7, -1); row 1: (0 + 1, -1 - 0.5) = (1, -1.5).
    X = np.array([[1, 2, 3], [0, -1, 0.5]], np.float32)
    W = np.array([[1, 0], [0, 1], [2, -1]], np.float32)
    Y = [[7, -1], [1, -1.5]]

    def test_hand_computed(self):
        np.testing.assert_array_equal(skinny_matmul_reference(jnp.asarray(self.X), jnp.asarray(self.W)), self.Y)

    def test_hand_computed_stacked(self):
        w = np.full((3, 3, 2), np.nan, np.float32)
        w[1] = self.W
        out = skinny_matmul_reference(jnp.asarray(self.X), jnp.asarray(w), jnp.int32(1))
        np.testing.assert_array_equal(out, self.Y)
        w[0] = 2 * self.W
        out = skinny_matmul_reference(jnp.asarray(self.X), jnp.asarray(w), 0)
        np.testing.assert_array_equal(out, 2 * np.array(self.Y))

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
    def test_matches_float64_numpy(self, dtype):
        rng = np.random.default_rng(0)
        x, w = random(rng, (5, 96), dtype), random(rng, (4, 96, 24), dtype)
        exact = np.asarray(x, np.float64) @ np.asarray(w[2], np.float64)
        out = skinny_matmul_reference(x, w, jnp.int32(2))
        assert out.dtype == dtype
        assert_close(out, exact, dtype)
        assert_close(skinny_matmul_reference(x, w[2]), exact, dtype)


@dataclasses.dataclass(frozen=True)
class MatmulCase:
    """One kernel configuration, run for each token count (one compile each)."""

    k: int
    n: int
    dtype: object
    block_sizes: GpuMatmulBlockSizes | None = None
    tokens: tuple[int, ...] = (1, 3, 16, 17, 64)

    def __str__(self):
        bs = self.block_sizes
        tiling = "default" if bs is None else (
            f"n{bs.block_n}k{bs.block_k}s{bs.split_k}{'' if bs.swap_ab else '-noswap'}")
        return f"{jnp.dtype(self.dtype).name}-K{self.k}N{self.n}-{tiling}"


CASES = [
    MatmulCase(16, 16, jnp.float32, tokens=(1, 17)),
    MatmulCase(128, 96, jnp.bfloat16, GpuMatmulBlockSizes(32, 32)),
    MatmulCase(256, 64, jnp.float32, GpuMatmulBlockSizes(16, 32, split_k=4)),
    MatmulCase(512, 128, jnp.bfloat16, GpuMatmulBlockSizes(64, 64, split_k=2, swap_ab=False)),
    MatmulCase(192, 80, jnp.bfloat16, GpuMatmulBlockSizes(16, 64, split_k=3), tokens=(1, 16, 64)),
    MatmulCase(64, 48, jnp.float16, GpuMatmulBlockSizes(16, 16, split_k=2), tokens=(3, 17)),
    MatmulCase(512, 512, jnp.bfloat16, tokens=(1, 16, 100)),
    MatmulCase(256, 256, jnp.float32, GpuMatmulBlockSizes(128, 16, split_k=4, swap_ab=False), tokens=(17, 100)),
]


class GpuMatmulTests:
    """The GPU kernel against the reference; subclasses set INTERPRET."""

    INTERPRET: bool

    def matmul(self, x, w, layer=None, block_sizes=None):
        return gpu.skinny_matmul(x, w, layer, block_sizes=block_sizes, interpret=self.INTERPRET)

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_reference(self, case):
        rng = np.random.default_rng(zlib.crc32(str(case).encode()))
        w = random(rng, (case.k, case.n), case.dtype)
        for t in case.tokens:
            x = random(rng, (t, case.k), case.dtype)
            out = self.matmul(x, w, block_sizes=case.block_sizes)
            assert out.shape == (t, case.n) and out.dtype == case.dtype
            assert_close(out, skinny_matmul_reference(x, w), case.dtype)

    @pytest.mark.parametrize("dtype, block_sizes", [
        (jnp.bfloat16, GpuMatmulBlockSizes(32, 32, split_k=2)),
        (jnp.float32, GpuMatmulBlockSizes(16, 16, swap_ab=False)),
    ], ids=["bf16-split2", "f32-noswap"])
    def test_stacked_layer_traced_in_jit(self, dtype, block_sizes):
        rng = np.random.default_rng(1)
        w = poisoned_stack(rng, 3, [1], 64, 64, dtype)
        x = random(rng, (3, 64), dtype)
        fn = jax.jit(lambda x, w, layer: self.matmul(x, w, layer, block_sizes))
        out = fn(x, w, jnp.int32(1))
        assert_close(out, skinny_matmul_reference(x, w[1]), dtype)

    def test_stacked_layers_in_fori_loop(self):
        """Layers 1 and 3 of 4, chosen by the loop counter; layers 0 and 2 are NaN."""
        rng = np.random.default_rng(2)
        dtype = jnp.bfloat16
        w = poisoned_stack(rng, 4, [1, 3], 128, 64, dtype)
        x = random(rng, (17, 128), dtype)
        bs = GpuMatmulBlockSizes(32, 32, split_k=2)

        @jax.jit
        def two_layers(x, w):
            def body(i, acc):
                return acc + self.matmul(x, w, 2 * i + 1, bs).astype(jnp.float32)
            return lax.fori_loop(0, 2, body, jnp.zeros((x.shape[0], w.shape[-1]), jnp.float32))

        ref = sum(skinny_matmul_reference(x, w[i]).astype(jnp.float32) for i in (1, 3))
        assert_close(two_layers(x, w), ref, dtype)


    @pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
    @pytest.mark.parametrize("dtype, block_sizes", [
        (jnp.bfloat16, GpuMatmulBlockSizes(32, 32)),
        (jnp.float32, GpuMatmulBlockSizes(16, 32, swap_ab=False)),
    ], ids=["bf16", "f32-noswap"])
    def test_gated_product_matches_reference(self, activation, dtype, block_sizes):
        """act(x @ gate) * (x @ up) from one weight of columns gate | up, layer traced; the
        reference is jax.nn's activation on the separately rounded halves."""
        rng = np.random.default_rng(3)
        w = poisoned_stack(rng, 3, [2], 64, 128, dtype)
        for t in (1, 17):
            x = random(rng, (t, 64), dtype)
            out = jax.jit(lambda x, w, layer: gpu.skinny_matmul(x, w, layer, block_sizes=block_sizes,
                                                                 interpret=self.INTERPRET, activation=activation))(
                x, w, jnp.int32(2))
            assert out.shape == (t, 64) and out.dtype == dtype
            assert_close(out, skinny_matmul_reference(x, w[2], activation=activation), dtype)

    def test_gated_product_refuses_a_split_of_k(self):
        x, w = jnp.zeros((1, 64), jnp.bfloat16), jnp.zeros((64, 64), jnp.bfloat16)
        with pytest.raises(ValueError, match="split_k == 1"):
            gpu.skinny_matmul(x, w, block_sizes=GpuMatmulBlockSizes(16, 16, split_k=2), interpret=True,
                              activation="silu")
        with pytest.raises(ValueError, match="activation must be"):
            gpu.skinny_matmul(x, w, block_sizes=GpuMatmulBlockSizes(16, 16), interpret=True, activation="relu")

    def test_unsummed_partials_add_up_to_the_product(self):
        rng = np.random.default_rng(4)
        x, w = random(rng, (5, 192), jnp.float32), random(rng, (192, 48), jnp.float32)
        bs = GpuMatmulBlockSizes(16, 16, split_k=3)
        parts = self.matmul_partials(x, w, bs)
        assert parts.shape == (3, 5, 48) and parts.dtype == jnp.float32
        assert_close(jnp.sum(parts, axis=0), skinny_matmul_reference(x, w), jnp.float32)
        # Each partial is the product over its third of K.
        assert_close(parts[1], skinny_matmul_reference(x[:, 64:128], w[64:128]), jnp.float32)
        whole = self.matmul_partials(x, w, GpuMatmulBlockSizes(16, 16))  # no split: the product itself
        assert whole.shape == (5, 48)

    def matmul_partials(self, x, w, block_sizes):
        return gpu.skinny_matmul(x, w, block_sizes=block_sizes, interpret=self.INTERPRET, sum_partials=False)


class TestGpuMatmulInterpret(GpuMatmulTests):
    INTERPRET = True


if jax.default_backend() == "gpu":
    class TestGpuMatmul(GpuMatmulTests):
        INTERPRET = False


class TestLowering:
    """The kernel lowers to Triton from any host; the stacked weight reaches the kernel whole."""

    @pytest.mark.parametrize("tokens", [1, 64, 100])
    @pytest.mark.parametrize("block_sizes", [GpuMatmulBlockSizes(128, 64, split_k=8, num_stages=4),
                                             GpuMatmulBlockSizes(64, 128, swap_ab=False)], ids=str)
    def test_stacked_lowers_to_triton_without_slicing(self, tokens, block_sizes):
        s = jax.ShapeDtypeStruct
        # 7.5 GB of weights: element offsets past 2**31 (the lowering switches to 64-bit).
        w = s((32, 4096, 28672), jnp.bfloat16)
        text = lower_for("cuda", lambda x, w, layer: gpu.skinny_matmul(x, w, layer, block_sizes=block_sizes),
                         s((tokens, 4096), jnp.bfloat16), w, s((), jnp.int32))
        assert "__gpu$xla.gpu.triton" in text
        # No w[layer] is sliced out before the call: the custom call gets the whole stack.
        assert "stablehlo.dynamic_slice" not in text and "stablehlo.slice" not in text
        assert "tensor<32x4096x28672xbf16>" in text.split("__gpu$xla.gpu.triton")[1].split("\n")[0]

    @pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
    def test_gated_product_lowers_to_triton(self, activation):
        s = jax.ShapeDtypeStruct
        text = lower_for("cuda", lambda x, w, layer: gpu.skinny_matmul(
            x, w, layer, block_sizes=GpuMatmulBlockSizes(128, 64, num_stages=4), activation=activation),
            s((16, 4096), jnp.bfloat16), s((32, 4096, 28672), jnp.bfloat16), s((), jnp.int32))
        assert "__gpu$xla.gpu.triton" in text and "stablehlo.dynamic_slice" not in text


class TestValidation:
    @staticmethod
    def inputs(dtype=jnp.float32, t=3, k=64, n=32):
        return jnp.zeros((t, k), dtype), jnp.zeros((k, n), dtype)

    @pytest.mark.parametrize("kernel", [gpu.skinny_matmul, skinny_matmul_reference])
    @pytest.mark.parametrize("make, message", [
        (lambda x, w: (x[0], w, None), "x must be"),
        (lambda x, w: (x, w[0], None), "w must be"),
        (lambda x, w: (x, w.astype(jnp.bfloat16), None), "must equal w dtype"),
        (lambda x, w: (x.astype(jnp.int32), w.astype(jnp.int32), None), "dtype int32 is not one of"),
        (lambda x, w: (x[:, :48], w, None), "rows"),
        (lambda x, w: (x, w, 0), "only for a stacked weight"),
        (lambda x, w: (x, w[None], None), "pass the layer index"),
        (lambda x, w: (x, w[None], 0.5), "layer must be one integer"),
        (lambda x, w: (x, w[None], jnp.zeros((2,), jnp.int32)), "layer must be one integer"),
    ])
    def test_rejects_bad_inputs(self, kernel, make, message):
        with pytest.raises(ValueError, match=message):
            kernel(*make(*self.inputs()))

    @pytest.mark.parametrize("block_sizes, message", [
        ((32, 16), "block_sizes must be a GpuMatmulBlockSizes"),
        (GpuMatmulBlockSizes(64, 16), "multiple of block_n"),
        (GpuMatmulBlockSizes(32, 128), "multiple of block_k \\* split_k"),
        (GpuMatmulBlockSizes(32, 32, split_k=3), "multiple of block_k \\* split_k"),
    ])
    def test_rejects_untileable_shapes(self, block_sizes, message):
        with pytest.raises(ValueError, match=message):
            gpu.skinny_matmul(*self.inputs(), block_sizes=block_sizes, interpret=True)

    @pytest.mark.parametrize("make", [
        lambda: GpuMatmulBlockSizes(0, 16), lambda: GpuMatmulBlockSizes(48, 16),
        lambda: GpuMatmulBlockSizes(8, 16), lambda: GpuMatmulBlockSizes(16, 8),
        lambda: GpuMatmulBlockSizes(16, 16, split_k=0), lambda: GpuMatmulBlockSizes(16, 16, num_warps=6),
        lambda: GpuMatmulBlockSizes(16, 16, num_stages=1.5), lambda: GpuMatmulBlockSizes(16, 16, swap_ab=1),
    ])
    def test_block_sizes_validate(self, make):
        with pytest.raises(ValueError):
            make()


LLAMA3_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


class TestBlockSizeDefaults:
    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
    def test_any_multiple_of_16_gets_a_valid_tiling(self, dtype):
        sizes = [16, 48, 80, 112, 272, 1008, 3584, 4096, 14336, 18944]
        for k in sizes:
            for n in sizes:
                for t in (1, 17, 64, 300):
                    bs = tbs.gpu_matmul_block_sizes(num_tokens=t, k=k, n=n, dtype=dtype,
                                                    device_kind="NVIDIA H200")
                    gpu.validate_block_sizes(bs, k, n)

    @pytest.mark.parametrize("k, n", [(4096, 100), (24, 4096), (0, 16)])
    def test_rejects_shapes_not_multiples_of_16(self, k, n):
        with pytest.raises(ValueError, match="multiple|positive"):
            tbs.gpu_matmul_block_sizes(num_tokens=1, k=k, n=n, dtype=jnp.bfloat16, device_kind="NVIDIA H200")

    @pytest.mark.parametrize("name", LLAMA3_8B)
    @pytest.mark.parametrize("tokens", [1, 16, 64])
    def test_heuristic_fills_the_h200_on_decode_shapes(self, name, tokens):
        """The fallback's promises (the measured table may trade them, e.g. 128 programs for o)."""
        k, n = LLAMA3_8B[name]
        bs = tbs.fallback_block_sizes(num_tokens=tokens, k=k, n=n, dtype=jnp.bfloat16, sms=132)
        gpu.validate_block_sizes(bs, k, n)
        programs = n // bs.block_n * bs.split_k
        assert 132 <= programs <= 16 * 132
        assert bs.block_n * 2 >= 128, "weight rows are read in segments of at least 128 bytes"
        assert bs.split_k * tokens * n * 4 <= 0.2 * k * n * 2, "split-K partials cost over 20% of the weight"

    def test_table_entries_are_valid(self):
        for (family, bucket, k, n, dtype), bs in tbs._GPU_TABLE.items():
            assert bucket == tbs.token_bucket(bucket)
            gpu.validate_block_sizes(bs, k, n)
            assert tbs.gpu_matmul_block_sizes(num_tokens=bucket, k=k, n=n, dtype=dtype,
                                              device_kind=f"NVIDIA {family}") is bs
