"""Flash attention (prefill): the reference against a hand-computed case, then the GPU (Pallas
Triton) and TPU (Pallas Mosaic) kernels against the reference, in interpret mode on any backend
and compiled where the device exists.

Each static configuration (one compile: dtype, heads, tiling, options, T and the number of
sequences) runs on several packed batches: lengths 1, block-1, block, block+1, an empty
sequence, one sequence filling T, random lengths. Padding rows of q, k and v are NaN, and rows
of other sequences are never masked at load time, only after it, so a leak shows as NaN.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention, flash_attention_dense, gpu, tpu
from pallas_kernels.flash_attention.reference import flash_attention_reference, token_positions
from pallas_kernels.flash_attention.tuned_block_sizes import GpuFlashBlockSizes, TpuFlashBlockSizes
from tests.test_paged_attention import assert_close, lower_for

NUM_SEQS = 4


@dataclasses.dataclass(frozen=True)
class FlashCase:
    """One static configuration (one compile) of a flash-attention kernel."""

    dtype: object
    num_heads: int
    num_kv_heads: int
    block_sizes: object = None
    causal: bool = True
    sliding_window: int | None = None
    logit_softcap: float | None = None
    head_dim: int = 16
    num_tokens: int = 64

    def __str__(self):
        return (f"{jnp.dtype(self.dtype).name}-N{self.num_heads}K{self.num_kv_heads}-{self.block_sizes}"
                f"-causal{self.causal}-w{self.sliding_window}-cap{self.logit_softcap}"
                + (f"-H{self.head_dim}" if self.head_dim != 16 else ""))

    def batches(self, rng):
        """NUM_SEQS sequence lengths per batch, summing to at most num_tokens."""
        b = getattr(self.block_sizes, "block_q", 16)
        fixed = [[1, b - 1, b, b + 1],  # block edges; the rest of T is padding
                 [2 * b + 3, 0, 1, self.num_tokens - 2 * b - 4],  # an empty sequence, no padding
                 [self.num_tokens, 0, 0, 0]]  # one sequence filling T
        cuts = np.sort(rng.integers(0, self.num_tokens - 5, NUM_SEQS))
        return fixed + [list(np.diff(np.concatenate([[0], cuts])))]

    def inputs(self, rng, lens):
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        shapes = [(self.num_tokens, n, self.head_dim) for n in (self.num_heads, self.num_kv_heads, self.num_kv_heads)]
        arrays = [rng.standard_normal(s) for s in shapes]
        for x in arrays:
            x[cu[-1]:] = np.nan
        return (*(jnp.asarray(x, self.dtype) for x in arrays), jnp.asarray(cu))

    @property
    def opts(self):
        return dict(scale=self.head_dim ** -0.5, causal=self.causal, sliding_window=self.sliding_window,
                    logit_softcap=self.logit_softcap)


def check_flash_kernel(kernel, case: FlashCase, interpret):
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    for lens in case.batches(rng):
        args = case.inputs(rng, lens)
        out = kernel(*args, block_sizes=case.block_sizes, interpret=interpret, **case.opts)
        ref = flash_attention_reference(*args, **case.opts)
        real = sum(lens)
        assert out.shape == args[0].shape and out.dtype == args[0].dtype
        assert_close(out, ref, case.dtype, rows=slice(0, real))
        np.testing.assert_array_equal(np.asarray(out[real:], np.float32), 0.0, err_msg="padding rows must be 0")


class TestReference:
    def test_token_positions(self):
        seq, pos, real = token_positions(jnp.array([0, 3, 3, 5], jnp.int32), 7)
        np.testing.assert_array_equal(real, [1, 1, 1, 1, 1, 0, 0])
        np.testing.assert_array_equal(seq[:5], [0, 0, 0, 2, 2])
        np.testing.assert_array_equal(pos[:5], [0, 1, 2, 0, 1])

    def test_hand_computed(self):
        # One head, head_dim 2. Sequence 0: keys (0, 0), (ln 3, 0); values (4, 0), (0, 8); both
        # queries (1, 0). Causal: position 0 sees key 0 -> (4, 0); position 1 sees logits
        # (0, ln 3) -> weights (1, 3) / 4 -> (1, 6). Sequence 1: one token, value (6, 6).
        # Row 3 is NaN padding and comes out zero.
        q = jnp.array([[[1, 0]], [[1, 0]], [[1, 1]], [[np.nan, np.nan]]], jnp.float32)
        k = jnp.array([[[0, 0]], [[math.log(3), 0]], [[5, 5]], [[np.nan, np.nan]]], jnp.float32)
        v = jnp.array([[[4, 0]], [[0, 8]], [[6, 6]], [[np.nan, np.nan]]], jnp.float32)
        cu = jnp.array([0, 2, 3], jnp.int32)

        def ref(**kw):
            return np.asarray(flash_attention_reference(q, k, v, cu, scale=1.0, **kw))[:, 0]

        np.testing.assert_allclose(ref(), [[4, 0], [1, 6], [6, 6], [0, 0]], rtol=1e-6)
        np.testing.assert_allclose(ref(causal=False), [[1, 6], [1, 6], [6, 6], [0, 0]], rtol=1e-6)
        np.testing.assert_allclose(ref(sliding_window=1), [[4, 0], [0, 8], [6, 6], [0, 0]], rtol=1e-6)
        # Soft-cap 1: logit ln 3 -> tanh(ln 3) = 0.8, so the weights are (1, e^0.8) / (1 + e^0.8).
        w = math.exp(0.8) / (1 + math.exp(0.8))
        np.testing.assert_allclose(ref(logit_softcap=1.0)[1], [4 * (1 - w), 8 * w], rtol=1e-6)


GPU_CASES = [
    FlashCase(jnp.float32, 2, 2, GpuFlashBlockSizes(16, 16)),
    FlashCase(jnp.bfloat16, 4, 2, GpuFlashBlockSizes(16, 32), sliding_window=5, logit_softcap=2.0),
    FlashCase(jnp.float32, 6, 2, GpuFlashBlockSizes(32, 16), causal=False),
    FlashCase(jnp.bfloat16, 2, 1, GpuFlashBlockSizes(16, 16), causal=False, sliding_window=9),
    FlashCase(jnp.float32, 2, 2, GpuFlashBlockSizes(16, 16), head_dim=40),
    FlashCase(jnp.bfloat16, 4, 2, GpuFlashBlockSizes(16, 32), head_dim=80, sliding_window=5),
]


class GpuFlashTests:
    INTERPRET: bool

    @pytest.mark.parametrize("case", GPU_CASES, ids=str)
    def test_matches_reference(self, case):
        check_flash_kernel(gpu.flash_attention, case, self.INTERPRET)

    def test_dense_layout(self):
        rng = np.random.default_rng(3)
        q, k, v = (jnp.asarray(rng.standard_normal((2, 20, n, 16)), jnp.float32) for n in (4, 2, 2))
        kw = dict(scale=0.25, sliding_window=7)
        out = flash_attention_dense(q, k, v, kernel=gpu.flash_attention, block_sizes=GpuFlashBlockSizes(16, 16),
                                    interpret=self.INTERPRET, **kw)
        for b in range(2):  # each batch row is one sequence
            ref = flash_attention_reference(q[b], k[b], v[b], jnp.array([0, 20], jnp.int32), **kw)
            assert_close(out[b], ref, jnp.float32)


class TestGpuFlashAttentionInterpret(GpuFlashTests):
    INTERPRET = True


if jax.default_backend() == "gpu":
    class TestGpuFlashAttention(GpuFlashTests):
        INTERPRET = False


TPU_CASES = [
    FlashCase(jnp.float32, 4, 2, TpuFlashBlockSizes(16, 8)),
    FlashCase(jnp.bfloat16, 6, 2, TpuFlashBlockSizes(8, 16), sliding_window=5, logit_softcap=2.0),
    FlashCase(jnp.float32, 2, 2, TpuFlashBlockSizes(16, 16), causal=False, num_tokens=37),
    FlashCase(jnp.float32, 4, 2, TpuFlashBlockSizes(16, 8), head_dim=96),
]


class TpuFlashTests:
    INTERPRET: bool

    @pytest.mark.parametrize("case", TPU_CASES, ids=str)
    def test_matches_reference(self, case):
        check_flash_kernel(tpu.flash_attention, case, self.INTERPRET)


class TestTpuFlashAttentionInterpret(TpuFlashTests):
    INTERPRET = True


if jax.default_backend() == "tpu":
    class TestTpuFlashAttention(TpuFlashTests):
        INTERPRET = False


def flash_avals(num_tokens=4 * 4096, num_seqs=4, num_heads=32, num_kv_heads=8, head_dim=128, dtype=jnp.bfloat16):
    s = jax.ShapeDtypeStruct
    return (s((num_tokens, num_heads, head_dim), dtype), s((num_tokens, num_kv_heads, head_dim), dtype),
            s((num_tokens, num_kv_heads, head_dim), dtype), s((num_seqs + 1,), jnp.int32))


class TestLowering:
    def test_gpu_kernel_lowers_to_triton(self):
        text = lower_for("cuda", lambda *a: gpu.flash_attention(
            *a, scale=0.1, sliding_window=100, logit_softcap=30.0,
            block_sizes=GpuFlashBlockSizes(128, 64, num_warps=8, num_stages=3)), *flash_avals())
        assert "__gpu$xla.gpu.triton" in text

    def test_tpu_kernel_lowers_to_mosaic(self):
        text = lower_for("tpu", lambda *a: tpu.flash_attention(
            *a, scale=0.1, sliding_window=100, logit_softcap=30.0, block_sizes=TpuFlashBlockSizes(128, 256)),
            *flash_avals(num_tokens=1024))
        assert "tpu_custom_call" in text


class TestValidation:
    @staticmethod
    def inputs(num_heads=4, num_kv_heads=2, dtype=jnp.float32):
        return (jnp.zeros((8, num_heads, 16), dtype), jnp.zeros((8, num_kv_heads, 16), dtype),
                jnp.zeros((8, num_kv_heads, 16), dtype), jnp.array([0, 8], jnp.int32))

    @pytest.mark.parametrize("kernel", [gpu.flash_attention, tpu.flash_attention, flash_attention_reference])
    @pytest.mark.parametrize("mutate, message", [
        (lambda a: (a[0][:, :3], *a[1:]), "multiple of num_kv_heads"),
        (lambda a: (a[0][0], *a[1:]), "q must be"),
        (lambda a: (a[0], a[1][:4], a[2][:4], a[3]), "tokens and head_dim"),
        (lambda a: (a[0], a[1], a[2][:, :1], a[3]), "v shape"),
        (lambda a: (a[0].astype(jnp.bfloat16), *a[1:]), "dtypes differ"),
        (lambda a: (*a[:3], a[3].astype(jnp.int16)), "cu_seq_lens must be int32"),
        (lambda a: (*a[:3], a[3][:1]), "num_seqs >= 1"),
        (lambda a: (*(x.astype(jnp.int32) for x in a[:3]), a[3]), "dtype int32 is not one of"),
    ])
    def test_rejects_bad_inputs(self, kernel, mutate, message):
        with pytest.raises(ValueError, match=message):
            kernel(*mutate(self.inputs()), scale=0.5)

    @pytest.mark.parametrize("opts, message", [
        (dict(scale=0.0), "scale must be"), (dict(scale=1.0, sliding_window=0), "sliding_window"),
        (dict(scale=1.0, logit_softcap=-1.0), "logit_softcap")])
    def test_rejects_bad_options(self, opts, message):
        with pytest.raises(ValueError, match=message):
            gpu.flash_attention(*self.inputs(), **opts)

    def test_gpu_rejects_tiles_too_small_for_the_tensor_cores(self):
        with pytest.raises(ValueError, match="tensor cores need at least 16"):
            gpu.flash_attention(*self.inputs(), scale=1.0, block_sizes=GpuFlashBlockSizes(16, 8))
        with pytest.raises(ValueError, match="neither"):  # k, v of 12 lanes for q of 24
            q, k, v, cu = self.inputs()
            gpu.flash_attention(jnp.pad(q, ((0, 0), (0, 0), (0, 8))), k[..., :12], v[..., :12], cu, scale=1.0)
        with pytest.raises(ValueError, match="block_sizes must be a GpuFlashBlockSizes"):
            gpu.flash_attention(*self.inputs(), scale=1.0, block_sizes=TpuFlashBlockSizes(16, 16))

    @pytest.mark.parametrize("make", [lambda: GpuFlashBlockSizes(24, 16), lambda: GpuFlashBlockSizes(16, 0),
                                      lambda: GpuFlashBlockSizes(16, 16, num_warps=3),
                                      lambda: TpuFlashBlockSizes(0, 8)])
    def test_block_sizes_validate(self, make):
        with pytest.raises(ValueError):
            make()

    def test_dense_rejects_packed_layout(self):
        with pytest.raises(ValueError, match=r"\[B, S, N, H\]"):
            flash_attention_dense(*self.inputs()[:3], scale=1.0)


def test_dispatch_picks_the_backend_kernel():
    case = FlashCase(jnp.float32, 4, 2)  # default block sizes: valid for whichever kernel is picked
    if jax.default_backend() in ("gpu", "tpu"):
        check_flash_kernel(flash_attention, case, interpret=False)
        return
    with pytest.raises(ValueError, match="pass interpret=True"):
        flash_attention(*TestValidation.inputs(), scale=1.0)
    check_flash_kernel(flash_attention, case, interpret=True)
