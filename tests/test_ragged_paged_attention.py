"""Ragged paged attention: the reference against hand-computed cases, then the GPU (Pallas
Triton) and TPU (Pallas Mosaic) kernels against the reference, in interpret mode on any
backend and compiled where the device exists.

Poisoning as in tests/test_paged_attention.py, plus: padding query rows are NaN, and
kv_lens, cu_q_lens and table rows past num_seqs hold garbage the kernels must not read.
Each static configuration (one compile) runs on several fresh batches: decodes, fresh
prefills (q_len = kv_len), chunked prefills, empty sequences, lengths at page edges, and
query counts on both sides of the GPU kernel's short/long tile boundary.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import gpu, ragged_paged_attention, tpu
from pallas_kernels.ragged_paged_attention.reference import (ragged_paged_attention_reference,
                                                             token_layout)
from pallas_kernels.ragged_paged_attention.tuned_block_sizes import (GpuRaggedBlockSizes,
                                                                     TpuRaggedBlockSizes,
                                                                     gpu_ragged_block_sizes)
from tests.test_paged_attention import POISON_SLOT, assert_close, lower_for, paged_cache

MAX_SEQS = 5


@dataclasses.dataclass(frozen=True)
class RaggedCase:
    """One static configuration (one compile) of a ragged kernel."""

    dtype: object
    num_heads: int
    num_kv_heads: int
    page_size: int
    block_sizes: object = None
    sliding_window: int | None = None
    logit_softcap: float | None = None
    head_dim: int = 16
    num_tokens: int = 48
    pages_per_seq: int = 6

    def __str__(self):
        return (f"{jnp.dtype(self.dtype).name}-N{self.num_heads}K{self.num_kv_heads}-ps{self.page_size}"
                f"-{self.block_sizes}-w{self.sliding_window}-cap{self.logit_softcap}"
                + (f"-H{self.head_dim}" if self.head_dim != 16 else ""))

    def batches(self, rng):
        """(q_lens, kv_lens) of the sequences in use; the rest of the MAX_SEQS slots is padding."""
        ps, full = self.page_size, self.pages_per_seq * self.page_size
        short = getattr(self.block_sizes, "short_query_len", 4)
        fixed = [
            ([1, ps + 1, 1, 0], [1, ps + 1, ps, 0]),  # decode at 1, fresh prefill, decode at page, empty
            ([short, short + 1, 9, 1, 1], [ps - 1 + short, full, 9, full, ps + 1]),
        ]
        q_lens = [int(x) for x in rng.integers(1, 12, 3)]
        kv_lens = [int(q + rng.integers(0, full - q + 1)) for q in q_lens]
        return fixed + [(q_lens, kv_lens)]

    def inputs(self, rng, q_lens, kv_lens):
        n = len(q_lens)
        lens = list(kv_lens) + [0] * (MAX_SEQS - n)
        k, v, tables = paged_cache(rng, lens=lens, pages_per_seq=self.pages_per_seq,
                                   num_kv_heads=self.num_kv_heads, page_size=self.page_size,
                                   head_dim=self.head_dim, dtype=self.dtype)
        tables = np.asarray(tables).copy()
        tables[n:] = rng.integers(-POISON_SLOT, POISON_SLOT, tables[n:].shape)
        cu = np.concatenate([[0], np.cumsum(q_lens)])
        cu = np.concatenate([cu, rng.integers(-1000, 1000, MAX_SEQS - n)]).astype(np.int32)
        kv = np.array(list(kv_lens) + list(rng.integers(10**6, 10**7, MAX_SEQS - n)), np.int32)
        q = rng.standard_normal((self.num_tokens, self.num_heads, self.head_dim))
        q[cu[n]:] = np.nan
        return (jnp.asarray(q, self.dtype), k, v, jnp.asarray(kv), jnp.asarray(tables),
                jnp.asarray(cu), jnp.asarray(n, jnp.int32))


def check_ragged_kernel(kernel, case: RaggedCase, interpret):
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    opts = dict(scale=case.head_dim ** -0.5, sliding_window=case.sliding_window,
                logit_softcap=case.logit_softcap)
    for q_lens, kv_lens in case.batches(rng):
        args = case.inputs(rng, q_lens, kv_lens)
        out = kernel(*args, block_sizes=case.block_sizes, interpret=interpret, **opts)
        ref = ragged_paged_attention_reference(*args, **opts)
        real = sum(q_lens)
        assert out.shape == args[0].shape and out.dtype == args[0].dtype
        assert_close(out, ref, case.dtype, rows=slice(0, real))
        assert np.all(np.isfinite(np.asarray(out[real:], np.float32))), "padding rows must be finite"


class TestReference:
    def test_layout_of_tokens(self):
        cu = jnp.array([0, 3, 3, 4, 99], jnp.int32)  # sequence 1 empty; entry 4 is past num_seqs
        kv = jnp.array([5, 7, 1, 123], jnp.int32)
        seq, pos, real = token_layout(cu, kv, jnp.array(3, jnp.int32), 6)
        np.testing.assert_array_equal(real, [1, 1, 1, 1, 0, 0])
        np.testing.assert_array_equal(seq[:4], [0, 0, 0, 2])
        np.testing.assert_array_equal(pos[:4], [2, 3, 4, 0])

    def test_hand_computed_causal_chunk(self):
        # One kv head, one query head, head_dim 2, page_size 2. The sequence has 3 cached tokens
        # on pages [3, 1]; its chunk is the last 2 (positions 1, 2). Keys 0, 0, (ln 3, 0),
        # values (4, 0), (0, 8), (2, 2); both queries are (1, 0).
        # Position 1 sees keys 0, 1: logits (0, 0) -> (2, 4). Position 2 sees all: logits
        # (0, 0, ln 3) -> (1, 1, 3) / 5 -> (10/5, 14/5). A decode sequence follows: 1 cached
        # token on page 2, key (0, 0), value (6, 6) -> (6, 6). Token 3 is padding.
        k = np.full((1, 4, 2, 2), np.nan, np.float32)
        v = np.full((1, 4, 2, 2), np.nan, np.float32)
        k[0, 3] = [[0, 0], [0, 0]]
        v[0, 3] = [[4, 0], [0, 8]]
        k[0, 1, 0] = [np.log(3), 0]
        v[0, 1, 0] = [2, 2]
        k[0, 2, 0] = [0, 0]
        v[0, 2, 0] = [6, 6]
        q = np.array([[[1, 0]], [[1, 0]], [[1, 0]], [[np.nan, np.nan]]], np.float32)
        args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.array([3, 1], jnp.int32),
                jnp.array([[3, 1], [2, POISON_SLOT]], jnp.int32), jnp.array([0, 2, 3], jnp.int32),
                jnp.array([2], jnp.int32))
        out = ragged_paged_attention_reference(*args, scale=1.0)
        np.testing.assert_allclose(out[:3, 0], [[2, 4], [2, 14 / 5], [6, 6]], rtol=1e-6)
        np.testing.assert_array_equal(out[3], 0.0)
        windowed = ragged_paged_attention_reference(*args, scale=1.0, sliding_window=1)
        np.testing.assert_allclose(windowed[:3, 0], [[0, 8], [2, 2], [6, 6]], rtol=1e-6)


GPU_CASES = [
    RaggedCase(jnp.float32, 4, 2, page_size=4, block_sizes=GpuRaggedBlockSizes(8, 4, 8, 4)),
    RaggedCase(jnp.bfloat16, 4, 2, page_size=4, block_sizes=GpuRaggedBlockSizes(16, 4, 8, 8),
               sliding_window=5, logit_softcap=2.0),
    RaggedCase(jnp.float32, 2, 2, page_size=8, block_sizes=GpuRaggedBlockSizes(16, 2, 16, 2),
               sliding_window=3),
    RaggedCase(jnp.float32, 6, 2, page_size=4),
    # Head sizes that are not powers of 2: zero-padded lanes inside the wrapper.
    RaggedCase(jnp.float32, 4, 2, page_size=4, block_sizes=GpuRaggedBlockSizes(8, 4, 8, 4), head_dim=40),
    RaggedCase(jnp.bfloat16, 4, 2, page_size=4, head_dim=80, sliding_window=5),
    RaggedCase(jnp.float32, 2, 1, page_size=8, head_dim=96, num_tokens=40),
]


class GpuRaggedTests:
    INTERPRET: bool

    @pytest.mark.parametrize("case", GPU_CASES, ids=str)
    def test_matches_reference(self, case):
        check_ragged_kernel(gpu.ragged_paged_attention, case, self.INTERPRET)

    def test_stacked_pools_read_the_layer_in_place(self):
        """Every layer's pools stacked, the layer a traced index: the tables address that
        layer's pages (the other layers are NaN), as the unstacked call on its pages."""
        case = RaggedCase(jnp.float32, 4, 2, page_size=4, block_sizes=GpuRaggedBlockSizes(8, 4, 8, 4))
        rng = np.random.default_rng(5)
        q_lens, kv_lens = case.batches(rng)[-1]
        q, k, v, *rest = case.inputs(rng, q_lens, kv_lens)
        opts = dict(scale=16 ** -0.5, block_sizes=case.block_sizes, interpret=self.INTERPRET)
        want = gpu.ragged_paged_attention(q, k, v, *rest, **opts)
        stack = [jnp.stack([jnp.full_like(x, jnp.nan), jnp.full_like(x, jnp.nan), x], axis=1) for x in (k, v)]
        got = jax.jit(lambda i: gpu.ragged_paged_attention(q, *stack, *rest, i, **opts))(jnp.int32(2))
        real = sum(q_lens)
        np.testing.assert_array_equal(np.asarray(got[:real]), np.asarray(want[:real]))
        with pytest.raises(ValueError, match="pass the layer index"):
            gpu.ragged_paged_attention(q, *stack, *rest, **opts)


class TestGpuRaggedPagedAttentionInterpret(GpuRaggedTests):
    INTERPRET = True

    def test_cache_kept_padded_gives_the_same_result(self):
        """The engine keeps the pages at the padded head size (zeros past the true one): the
        kernel reads them as they are, and matches the unpadded call."""
        case = RaggedCase(jnp.float32, 4, 2, page_size=4, block_sizes=GpuRaggedBlockSizes(8, 4, 8, 4), head_dim=40)
        rng = np.random.default_rng(3)
        q_lens, kv_lens = case.batches(rng)[0]
        q, k, v, *rest = case.inputs(rng, q_lens, kv_lens)
        padded = [jnp.pad(x, ((0, 0),) * 3 + ((0, 24),)) for x in (k, v)]
        opts = dict(scale=40 ** -0.5, block_sizes=case.block_sizes, interpret=True)
        want = gpu.ragged_paged_attention(q, k, v, *rest, **opts)
        got = gpu.ragged_paged_attention(q, *padded, *rest, **opts)
        real = sum(q_lens)
        assert got.shape == q.shape
        np.testing.assert_array_equal(np.asarray(got[:real]), np.asarray(want[:real]))
        with pytest.raises(ValueError, match="neither"):
            gpu.ragged_paged_attention(q, k[..., :32], v[..., :32], *rest, **opts)


if jax.default_backend() == "gpu":
    class TestGpuRaggedPagedAttention(GpuRaggedTests):
        INTERPRET = False


TPU_CASES = [
    RaggedCase(jnp.float32, 4, 2, page_size=4, block_sizes=TpuRaggedBlockSizes(8, 2)),
    RaggedCase(jnp.bfloat16, 6, 2, page_size=8, block_sizes=TpuRaggedBlockSizes(16, 1),
               sliding_window=5, logit_softcap=2.0),
    RaggedCase(jnp.float32, 2, 2, page_size=4, block_sizes=TpuRaggedBlockSizes(16, 4), num_tokens=37),
    RaggedCase(jnp.float32, 4, 2, page_size=4, block_sizes=TpuRaggedBlockSizes(8, 2), head_dim=40),
]


class TpuRaggedTests:
    INTERPRET: bool

    @pytest.mark.parametrize("case", TPU_CASES, ids=str)
    def test_matches_reference(self, case):
        check_ragged_kernel(tpu.ragged_paged_attention, case, self.INTERPRET)


class TestTpuRaggedPagedAttentionInterpret(TpuRaggedTests):
    INTERPRET = True


if jax.default_backend() == "tpu":
    class TestTpuRaggedPagedAttention(TpuRaggedTests):
        INTERPRET = False


def ragged_avals(num_tokens=4152, max_seqs=64, num_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
                 pages_per_seq=128, num_pages=8192, dtype=jnp.bfloat16):
    s = jax.ShapeDtypeStruct
    cache = s((num_kv_heads, num_pages, page_size, head_dim), dtype)
    return (s((num_tokens, num_heads, head_dim), dtype), cache, cache, s((max_seqs,), jnp.int32),
            s((max_seqs, pages_per_seq), jnp.int32), s((max_seqs + 1,), jnp.int32), s((1,), jnp.int32))


class TestLowering:
    def test_gpu_kernel_lowers_to_triton(self):
        text = lower_for("cuda", lambda *a: gpu.ragged_paged_attention(
            *a, scale=0.1, sliding_window=100, logit_softcap=30.0,
            block_sizes=GpuRaggedBlockSizes(32, 4, 4, 8, num_warps=4, num_stages=3)), *ragged_avals())
        assert "__gpu$xla.gpu.triton" in text

    def test_gpu_kernel_lowers_to_triton_over_stacked_pools(self):
        """The engine's call: every layer's pools and a traced layer index, read in place (no
        slice of the pools, no add on the tables outside the kernel)."""
        q, cache, _, *rest = ragged_avals(num_pages=1024)
        stacked = jax.ShapeDtypeStruct((cache.shape[0], 32, *cache.shape[1:]), cache.dtype)
        text = lower_for("cuda", lambda q, k, v, *a: gpu.ragged_paged_attention(q, k, v, *a, scale=0.1),
                         q, stacked, stacked, *rest, jax.ShapeDtypeStruct((), jnp.int32))
        assert "__gpu$xla.gpu.triton" in text
        assert "stablehlo.dynamic_slice" not in text and "stablehlo.add" not in text

    def test_tpu_kernel_lowers_to_mosaic(self):
        text = lower_for("tpu", lambda *a: tpu.ragged_paged_attention(
            *a, scale=0.1, sliding_window=100, logit_softcap=30.0, block_sizes=TpuRaggedBlockSizes(32, 8)),
            *ragged_avals(num_tokens=256, max_seqs=16, pages_per_seq=32, num_pages=1024))
        assert "tpu_custom_call" in text


class TestValidation:
    @staticmethod
    def inputs(num_heads=4, num_kv_heads=2, dtype=jnp.float32):
        q = jnp.zeros((8, num_heads, 16), dtype)
        cache = jnp.zeros((num_kv_heads, 6, 4, 16), dtype)
        return (q, cache, cache, jnp.zeros((3,), jnp.int32), jnp.zeros((3, 2), jnp.int32),
                jnp.zeros((4,), jnp.int32), jnp.array([1], jnp.int32))

    @pytest.mark.parametrize("kernel", [gpu.ragged_paged_attention, tpu.ragged_paged_attention])
    @pytest.mark.parametrize("mutate, message", [
        (lambda a: (*a[:3], a[3][:2], *a[4:]), "kv_lens must have shape"),
        (lambda a: (*a[:5], a[5][:3], a[6]), "cu_q_lens must have shape"),
        (lambda a: (*a[:4], a[4].astype(jnp.int16), *a[5:]), "block_tables must be int32"),
        (lambda a: (*a[:6], jnp.array([1, 2], jnp.int32)), "num_seqs must be one int32"),
        (lambda a: (*a[:6], jnp.array([1.0])), "num_seqs must be one int32"),
        (lambda a: (a[0][:, :3], *a[1:]), "multiple of num_kv_heads"),
        (lambda a: (a[0][0], *a[1:]), "q must be"),
    ])
    def test_rejects_bad_inputs(self, kernel, mutate, message):
        with pytest.raises(ValueError, match=message):
            kernel(*mutate(self.inputs()), scale=0.5)

    def test_gpu_rejects_tiles_too_small_for_the_tensor_cores(self):
        with pytest.raises(ValueError, match="tensor cores need at least 16"):
            gpu.ragged_paged_attention(*self.inputs(num_heads=2), scale=1.0,
                                       block_sizes=GpuRaggedBlockSizes(16, 4, 4, 4))
        with pytest.raises(ValueError, match="dots need at least 16"):
            gpu.ragged_paged_attention(*self.inputs(), scale=1.0, block_sizes=GpuRaggedBlockSizes(16, 2, 8, 4))

    @pytest.mark.parametrize("make", [
        lambda: GpuRaggedBlockSizes(16, 1, 32, 1), lambda: GpuRaggedBlockSizes(12, 1, 4, 1),
        lambda: GpuRaggedBlockSizes(16, 0, 4, 1), lambda: TpuRaggedBlockSizes(0, 1),
    ])
    def test_block_sizes_validate(self, make):
        with pytest.raises(ValueError):
            make()

    def test_default_tiles_fit_any_head_grouping(self):
        for group in (1, 2, 3, 4, 8, 16):
            bs = gpu_ragged_block_sizes(group=group, head_dim=128, page_size=16, dtype=jnp.bfloat16,
                                        device_kind="NVIDIA H100 80GB HBM3")
            rows = 1 << (group - 1).bit_length()
            assert bs.short_query_len * rows >= 16 and bs.queries_per_block * rows >= 16


def test_dispatch_picks_the_backend_kernel():
    case = GPU_CASES[-1]  # default block sizes: valid for whichever kernel is picked
    if jax.default_backend() in ("gpu", "tpu"):
        check_ragged_kernel(ragged_paged_attention, case, interpret=False)
        return
    with pytest.raises(ValueError, match="pass interpret=True"):
        ragged_paged_attention(*TestValidation.inputs(), scale=1.0)
    check_ragged_kernel(ragged_paged_attention, case, interpret=True)
