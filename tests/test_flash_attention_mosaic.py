"""The Mosaic GPU flash-attention kernel (pallas_kernels/flash_attention/mosaic_gpu.py) against
the reference: in the Mosaic GPU interpreter on any backend (the copy pipeline, barriers, turns
and masks as the GPU runs them; the two matmuls as plain dots, since the interpreter's wgmma
takes no transposed operand), and compiled on a Hopper GPU.

Fresh random inputs per case; float32 reference on the upcast inputs."""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention_dense, mosaic_gpu
from pallas_kernels.flash_attention.reference import flash_attention_reference
from pallas_kernels.flash_attention.tuned_block_sizes import MosaicFlashBlockSizes
from tests.test_paged_attention import assert_close, lower_for


@dataclasses.dataclass(frozen=True)
class MosaicCase:
    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_sizes: MosaicFlashBlockSizes
    dtype: object = jnp.bfloat16
    causal: bool = True
    sliding_window: int | None = None
    logit_softcap: float | None = None

    def __str__(self):
        return (f"B{self.batch}S{self.seq_len}N{self.num_heads}K{self.num_kv_heads}H{self.head_dim}-"
                f"q{self.block_sizes.block_q}kv{self.block_sizes.block_kv}st{self.block_sizes.num_stages}-"
                f"{jnp.dtype(self.dtype).name}-causal{self.causal}-w{self.sliding_window}-cap{self.logit_softcap}")


# Interpreted cases stay small: the interpreter runs each warpgroup as a thread.
INTERPRET_CASES = [
    MosaicCase(1, 256, 2, 1, 64, MosaicFlashBlockSizes(64, 64, 2)),
    MosaicCase(1, 256, 2, 2, 64, MosaicFlashBlockSizes(64, 128, 3), dtype=jnp.float16, causal=False),
    # The window ends inside the CTA's range: the second warpgroup steps over blocks only the
    # first one needs, and the first over blocks past its causal end.
    MosaicCase(1, 256, 2, 1, 64, MosaicFlashBlockSizes(64, 64, 2), sliding_window=70, logit_softcap=20.0),
]
GPU_CASES = INTERPRET_CASES + [
    MosaicCase(2, 1024, 8, 2, 128, MosaicFlashBlockSizes(64, 128, 2)),
    MosaicCase(2, 1024, 8, 2, 128, MosaicFlashBlockSizes(64, 128, 3), sliding_window=300, logit_softcap=30.0),
    MosaicCase(1, 512, 4, 4, 128, MosaicFlashBlockSizes(64, 64, 2), dtype=jnp.float16, causal=False,
               sliding_window=65),
    MosaicCase(1, 384, 4, 1, 256, MosaicFlashBlockSizes(64, 64, 2)),
]


def check_mosaic(case: MosaicCase, interpret: bool, seed: int):
    rng = np.random.default_rng(seed)
    shapes = [(case.batch, case.seq_len, n, case.head_dim)
              for n in (case.num_heads, case.num_kv_heads, case.num_kv_heads)]
    q, k, v = (jnp.asarray(rng.standard_normal(s), case.dtype) for s in shapes)
    opts = dict(scale=case.head_dim ** -0.5, causal=case.causal, sliding_window=case.sliding_window,
                logit_softcap=case.logit_softcap)
    out = mosaic_gpu.flash_attention_dense(q, k, v, block_sizes=case.block_sizes, interpret=interpret, **opts)
    ref = flash_attention_dense(*(x.astype(jnp.float32) for x in (q, k, v)), kernel=flash_attention_reference,
                                **opts)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, case.dtype)


if jax.default_backend() != "gpu":
    # On a GPU machine the compiled class below runs these cases instead (there, under JAX
    # 0.11.2, the interpreted ones did not finish within 7 minutes).
    class TestMosaicFlashInterpret:
        @pytest.mark.parametrize("case", INTERPRET_CASES, ids=str)
        def test_matches_reference(self, case):
            check_mosaic(case, interpret=True, seed=zlib.crc32(str(case).encode()))


if jax.default_backend() == "gpu" and mosaic_gpu.is_supported_device():
    class TestMosaicFlash:
        @pytest.mark.parametrize("case", GPU_CASES, ids=str)
        def test_matches_reference(self, case):
            check_mosaic(case, interpret=False, seed=zlib.crc32(str(case).encode()))

        def test_dense_dispatch_picks_it(self):
            """flash_attention_dense with no kernel runs this one where it applies: bit for bit
            the output of calling it directly."""
            rng = np.random.default_rng(11)
            q, k, v = (jnp.asarray(rng.standard_normal((1, 512, n, 128)), jnp.bfloat16) for n in (8, 2, 2))
            assert mosaic_gpu.applies(q, k, v)
            out = flash_attention_dense(q, k, v, scale=0.088)
            np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(
                mosaic_gpu.flash_attention_dense(q, k, v, scale=0.088), np.float32))


@pytest.mark.parametrize("opts", [dict(causal=True), dict(causal=False),
                                  dict(causal=True, sliding_window=300, logit_softcap=30.0)], ids=str)
def test_lowers_to_mosaic_gpu_at_p3(opts):
    """The P3 shape goes through the Mosaic GPU lowering with the tuned tiling, on any host."""
    q = jax.ShapeDtypeStruct((4, 4096, 32, 128), jnp.bfloat16)
    text = lower_for("cuda", lambda q, k, v: mosaic_gpu.flash_attention_dense(q, k, v, scale=0.1, **opts), q, q, q)
    assert "mosaic_gpu" in text


class TestMosaicValidation:
    @staticmethod
    def inputs(b=1, s=256, n=4, kh=2, h=64, dtype=jnp.bfloat16):
        return (jnp.zeros((b, s, n, h), dtype), jnp.zeros((b, s, kh, h), dtype), jnp.zeros((b, s, kh, h), dtype))

    @pytest.mark.parametrize("inputs, opts, message", [
        (dict(dtype=jnp.float32), {}, "share one of"),
        (dict(h=48), {}, "multiple of 64"),
        (dict(h=512), {}, "at most 256"),
        (dict(s=200), {}, "multiple of 128"),
        (dict(n=3), {}, "multiple of K"),
        ({}, dict(sliding_window=0), "sliding_window"),
        ({}, dict(logit_softcap=-2.0), "logit_softcap"),
    ])
    def test_rejects(self, inputs, opts, message):
        with pytest.raises(ValueError, match=message):
            mosaic_gpu.flash_attention_dense(*self.inputs(**inputs), scale=0.1, **opts)

    def test_rejects_packed_layout(self):
        q, k, v = self.inputs()
        with pytest.raises(ValueError, match=r"\[B, S, N, H\]"):
            mosaic_gpu.flash_attention_dense(q[0], k[0], v[0], scale=0.1)

    @pytest.mark.parametrize("make", [lambda: MosaicFlashBlockSizes(32, 64), lambda: MosaicFlashBlockSizes(64, 96),
                                      lambda: MosaicFlashBlockSizes(64, 64, 1)])
    def test_block_sizes_validate(self, make):
        with pytest.raises(ValueError):
            make()


def test_dense_dispatch_falls_back_where_the_mosaic_kernel_does_not_apply():
    """float32 (which the Mosaic kernel does not take) goes to the packed kernel on any backend."""
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 24, n, 16)), jnp.float32) for n in (4, 2, 2))
    assert not mosaic_gpu.applies(q, k, v, sliding_window=None, logit_softcap=None)
    interpret = jax.default_backend() not in ("gpu", "tpu")
    out = flash_attention_dense(q, k, v, scale=0.25, interpret=interpret)
    for b in range(2):
        ref = flash_attention_reference(q[b], k[b], v[b], jnp.array([0, 24], jnp.int32), scale=0.25)
        assert_close(out[b], ref, jnp.float32)
