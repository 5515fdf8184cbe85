"""Paged decode attention: the reference against hand-computed cases, then the GPU (Pallas
Triton) and TPU (Pallas Mosaic) kernels against the reference, in interpret mode on any
backend and compiled where the device exists.

Inputs are poisoned where the kernels must not look: unused pages, page 0 and the tail of
each sequence's last page are NaN, unused table slots hold out-of-range ids, page ids are a
random permutation. Each static configuration (one compile) is run on several fresh draws
of lengths, including 0, 1, page-1, page, page+1 and the table's full length.

The helpers here are shared with tests/test_ragged_paged_attention.py.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import merge_splits
from pallas_kernels.paged_attention import gpu, paged_attention, tpu
from pallas_kernels.paged_attention.reference import paged_attention_reference
from pallas_kernels.paged_attention.tuned_block_sizes import (GpuDecodeBlockSizes,
                                                              TpuDecodeBlockSizes,
                                                              gpu_decode_block_sizes)

# Max |kernel - reference| / max |reference| per dtype: float32 kernels use exact float32
# products; bfloat16 ones round the softmax weights to bfloat16 before p @ v.
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 4e-3}
POISON_SLOT = 2**30


def paged_cache(rng, *, lens, pages_per_seq, num_kv_heads, page_size, head_dim, dtype):
    """K, V [K, num_pages, page_size, H] and block tables [len(lens), pages_per_seq].

    num_pages depends only on the table's shape (one compile per configuration, whatever the
    lengths), with two pages to spare. Sequence s gets cdiv(lens[s], page_size) pages from a
    random permutation of the pages 1..num_pages-1; its other slots hold POISON_SLOT.
    Everything not holding a cached token (page 0, unused pages, the tail of each last page)
    is NaN.
    """
    num_pages = 1 + len(lens) * pages_per_seq + 2
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k = np.full(shape, np.nan, np.float32)
    v = np.full(shape, np.nan, np.float32)
    tables = np.full((len(lens), pages_per_seq), POISON_SLOT, np.int32)
    perm = rng.permutation(np.arange(1, num_pages))
    cursor = 0
    for s, n in enumerate(lens):
        pages = perm[cursor:cursor + -(-n // page_size)]
        cursor += len(pages)
        tables[s, :len(pages)] = pages
        for i, page in enumerate(pages):
            valid = min(page_size, n - i * page_size)
            k[:, page, :valid] = rng.standard_normal((num_kv_heads, valid, head_dim))
            v[:, page, :valid] = rng.standard_normal((num_kv_heads, valid, head_dim))
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(tables)


def assert_close(out, ref, dtype, rows=None):
    """out vs ref (only `rows` if given) at the dtype's tolerance; NaN or inf never passes."""
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    if rows is not None:
        out, ref = out[rows], ref[rows]
    assert np.all(np.isfinite(out)), "kernel output has NaN or inf where it is compared"
    assert np.all(np.isfinite(ref)), "reference output has NaN or inf"
    err = float(np.max(np.abs(out - ref), initial=0.0)) / max(float(np.max(np.abs(ref), initial=0.0)), 1e-6)
    assert err <= TOLERANCE[jnp.dtype(dtype)], f"max error {err:.3g} relative to max |ref|"


def register_cpu_as_tpu():
    """Lets Mosaic lower kernels for 'tpu' on a CPU host by describing the host as a v5e."""
    from jax._src.pallas.mosaic import tpu_info
    from jax.experimental.pallas import tpu as pltpu

    tpu_info.registry.setdefault(
        jax.devices()[0].device_kind,
        lambda: pltpu.get_tpu_info_for_chip(pltpu.ChipVersion.TPU_V5E, 1))


def lower_for(platform, fn, *avals):
    """Lowers fn for `platform` without its device: runs the Pallas lowering (Triton IR for
    'cuda', Mosaic for 'tpu') and returns the StableHLO text."""
    if platform == "tpu":
        register_cpu_as_tpu()
    return jax.jit(fn).trace(*avals).lower(lowering_platforms=(platform,)).as_text()


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """One static configuration (one compile) of a decode kernel."""

    dtype: object
    num_heads: int
    num_kv_heads: int
    page_size: int
    pages_per_seq: int
    block_sizes: object = None
    sliding_window: int | None = None
    logit_softcap: float | None = None
    head_dim: int = 16
    batch: int = 6

    def __str__(self):
        return (f"{jnp.dtype(self.dtype).name}-N{self.num_heads}K{self.num_kv_heads}-ps{self.page_size}"
                f"-{self.block_sizes}-w{self.sliding_window}-cap{self.logit_softcap}"
                + (f"-H{self.head_dim}" if self.head_dim != 16 else ""))

    def draws(self, rng):
        """Length sets: the edges first, then random lengths (0 included)."""
        ps, full = self.page_size, self.pages_per_seq * self.page_size
        edges = [0, 1, ps - 1, ps, ps + 1, full][: self.batch]
        return [edges, list(rng.integers(0, full + 1, self.batch))]


def check_decode_kernel(kernel, case: DecodeCase, interpret, seed):
    rng = np.random.default_rng(seed)
    scale = case.head_dim ** -0.5
    opts = dict(scale=scale, sliding_window=case.sliding_window, logit_softcap=case.logit_softcap)
    for lens in case.draws(rng):
        k, v, tables = paged_cache(rng, lens=lens, pages_per_seq=case.pages_per_seq,
                                   num_kv_heads=case.num_kv_heads, page_size=case.page_size,
                                   head_dim=case.head_dim, dtype=case.dtype)
        q = jnp.asarray(rng.standard_normal((case.batch, case.num_heads, case.head_dim)), case.dtype)
        seq_lens = jnp.asarray(lens, jnp.int32)
        out = kernel(q, k, v, tables, seq_lens, block_sizes=case.block_sizes, interpret=interpret, **opts)
        ref = paged_attention_reference(q, k, v, tables, seq_lens, **opts)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_close(out, ref, case.dtype)
        empty = np.asarray(lens) == 0
        np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)


class TestReference:
    """The reference itself, on cases small enough to compute by hand."""

    # One sequence, one kv head, two query heads, head_dim 2, page_size 2, seq_len 3 on pages [2, 1].
    # Keys 0, 1, 2 = (0, 0), (ln 3, 0), (0, 0); values (4, 0), (0, 8), (2, 2).
    # Query head 0 = (1, 0): logits (0, ln 3, 0) -> softmax (1, 3, 1) / 5 -> out (6/5, 26/5).
    # Query head 1 = (0, 1): logits (0, 0, 0) -> out = mean of values = (2, 10/3).
    @staticmethod
    def hand_case(poison=np.nan):
        k = np.full((1, 4, 2, 2), poison, np.float32)
        v = np.full((1, 4, 2, 2), poison, np.float32)
        k[0, 2] = [[0, 0], [math.log(3), 0]]
        v[0, 2] = [[4, 0], [0, 8]]
        k[0, 1, 0] = [0, 0]
        v[0, 1, 0] = [2, 2]
        q = np.array([[[1, 0], [0, 1]]], np.float32)
        tables = np.array([[2, 1, POISON_SLOT]], np.int32)
        return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(tables)

    def test_hand_computed(self):
        q, k, v, tables = self.hand_case()
        out = paged_attention_reference(q, k, v, tables, jnp.array([3], jnp.int32), scale=1.0)
        np.testing.assert_allclose(out[0], [[6 / 5, 26 / 5], [2, 10 / 3]], rtol=1e-6)

    def test_window_softcap_and_empty(self):
        q, k, v, tables = self.hand_case()
        last_two = paged_attention_reference(q, k, v, tables, jnp.array([3], jnp.int32), scale=1.0,
                                             sliding_window=2)
        # Keys 1, 2 only: head 0 logits (ln 3, 0) -> (3, 1) / 4; head 1 -> mean of values 1, 2.
        np.testing.assert_allclose(last_two[0], [[2 / 4, 26 / 4], [1, 5]], rtol=1e-6)
        capped = paged_attention_reference(q, k, v, tables, jnp.array([3], jnp.int32), scale=1.0,
                                           logit_softcap=0.5)
        w = np.exp(0.5 * np.tanh(np.array([0, math.log(3), 0]) / 0.5))
        np.testing.assert_allclose(capped[0, 0], (w[0] * np.array([4, 0]) + w[1] * np.array([0, 8])
                                                  + w[2] * np.array([2, 2])) / w.sum(), rtol=1e-6)
        empty = paged_attention_reference(q, k, v, tables, jnp.array([0], jnp.int32), scale=1.0)
        np.testing.assert_array_equal(empty, 0.0)

    def test_short_sequence_ignores_later_slots(self):
        q, k, v, tables = self.hand_case()
        # seq_len 2: only page 2 counts; slot 1 (page 1) and slot 2 (poison id) are never used.
        out = paged_attention_reference(q, k, v, tables, jnp.array([2], jnp.int32), scale=1.0)
        np.testing.assert_allclose(out[0], [[1, 6], [2, 4]], rtol=1e-6)


GPU_CASES = [
    DecodeCase(jnp.float32, 4, 2, page_size=4, pages_per_seq=5, block_sizes=GpuDecodeBlockSizes(4, 1)),
    DecodeCase(jnp.bfloat16, 4, 2, page_size=4, pages_per_seq=9, block_sizes=GpuDecodeBlockSizes(4, 3)),
    DecodeCase(jnp.float32, 2, 2, page_size=8, pages_per_seq=4, block_sizes=GpuDecodeBlockSizes(2, 1),
               sliding_window=5),
    DecodeCase(jnp.float32, 6, 2, page_size=4, pages_per_seq=6, block_sizes=GpuDecodeBlockSizes(4, 2),
               logit_softcap=2.0),
    DecodeCase(jnp.bfloat16, 4, 2, page_size=16, pages_per_seq=3, block_sizes=GpuDecodeBlockSizes(1, 2),
               sliding_window=7, logit_softcap=5.0, head_dim=32),
    DecodeCase(jnp.float32, 4, 1, page_size=4, pages_per_seq=5),
    DecodeCase(jnp.float32, 4, 2, page_size=4, pages_per_seq=5, block_sizes=GpuDecodeBlockSizes(4, 2), head_dim=40),
    DecodeCase(jnp.bfloat16, 2, 1, page_size=8, pages_per_seq=3, head_dim=96),
]


class GpuDecodeTests:
    """The GPU kernel against the reference; subclasses set INTERPRET."""

    INTERPRET: bool

    @pytest.mark.parametrize("case", GPU_CASES, ids=str)
    def test_matches_reference(self, case):
        check_decode_kernel(gpu.paged_attention, case, self.INTERPRET, seed=zlib.crc32(str(case).encode()))


class TestGpuPagedAttentionInterpret(GpuDecodeTests):
    INTERPRET = True


if jax.default_backend() == "gpu":
    class TestGpuPagedAttention(GpuDecodeTests):
        INTERPRET = False


TPU_CASES = [
    DecodeCase(jnp.float32, 4, 2, page_size=4, pages_per_seq=5, block_sizes=TpuDecodeBlockSizes(1, 1)),
    DecodeCase(jnp.bfloat16, 6, 2, page_size=8, pages_per_seq=4, block_sizes=TpuDecodeBlockSizes(2, 2),
               sliding_window=5, logit_softcap=2.0),
    DecodeCase(jnp.float32, 2, 2, page_size=4, pages_per_seq=6, block_sizes=TpuDecodeBlockSizes(4, 3),
               sliding_window=3),
    DecodeCase(jnp.float32, 4, 2, page_size=4, pages_per_seq=5, block_sizes=TpuDecodeBlockSizes(1, 1), head_dim=80),
]


class TpuDecodeTests:
    INTERPRET: bool

    @pytest.mark.parametrize("case", TPU_CASES, ids=str)
    def test_matches_reference(self, case):
        check_decode_kernel(tpu.paged_attention, case, self.INTERPRET, seed=zlib.crc32(str(case).encode()))


class TestTpuPagedAttentionInterpret(TpuDecodeTests):
    INTERPRET = True


if jax.default_backend() == "tpu":
    class TestTpuPagedAttention(TpuDecodeTests):
        INTERPRET = False


def decode_avals(batch=64, num_heads=32, num_kv_heads=8, head_dim=128, page_size=16, pages_per_seq=128,
                 num_pages=8192, dtype=jnp.bfloat16):
    s = jax.ShapeDtypeStruct
    cache = s((num_kv_heads, num_pages, page_size, head_dim), dtype)
    return (s((batch, num_heads, head_dim), dtype), cache, cache, s((batch, pages_per_seq), jnp.int32),
            s((batch,), jnp.int32))


class TestLowering:
    """Both kernels lower for their real backend from any host (Triton IR, Mosaic)."""

    @pytest.mark.parametrize("splits", [1, 4])
    def test_gpu_kernel_lowers_to_triton(self, splits):
        text = lower_for("cuda", lambda *a: gpu.paged_attention(
            *a, scale=0.1, sliding_window=100, logit_softcap=30.0,
            block_sizes=GpuDecodeBlockSizes(8, splits, num_warps=4, num_stages=3)), *decode_avals())
        assert "__gpu$xla.gpu.triton" in text

    def test_tpu_kernel_lowers_to_mosaic(self):
        text = lower_for("tpu", lambda *a: tpu.paged_attention(
            *a, scale=0.1, sliding_window=100, logit_softcap=30.0, block_sizes=TpuDecodeBlockSizes(8, 2)),
            *decode_avals(batch=4, pages_per_seq=32, num_pages=256))
        assert "tpu_custom_call" in text


class TestValidation:
    @staticmethod
    def inputs(dtype=jnp.float32, num_heads=4, num_kv_heads=2, head_dim=16, page_size=4):
        q = jnp.zeros((2, num_heads, head_dim), dtype)
        cache = jnp.zeros((num_kv_heads, 6, page_size, head_dim), dtype)
        return q, cache, cache, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,), jnp.int32)

    @pytest.mark.parametrize("kernel", [gpu.paged_attention, tpu.paged_attention, paged_attention_reference])
    @pytest.mark.parametrize("mutate, message", [
        (lambda a: (a[0], a[1], a[2][:, :5], *a[3:]), "v_pages shape"),
        (lambda a: (a[0].astype(jnp.bfloat16), *a[1:]), "q dtype"),
        (lambda a: (a[0][:, :3], *a[1:]), "multiple of num_kv_heads"),
        (lambda a: (jnp.pad(a[0], ((0, 0), (0, 0), (0, 8))), *a[1:]), "head_dim"),  # 24 lanes vs 16
        (lambda a: (*a[:3], a[3].astype(jnp.float32), a[4]), "block_tables must be int32"),
        (lambda a: (*a[:4], a[4][:1]), "seq_lens must have shape"),
        (lambda a: (a[0].astype(jnp.int32), a[1].astype(jnp.int32), a[2].astype(jnp.int32), *a[3:]), "dtype"),
    ])
    def test_rejects_bad_inputs(self, kernel, mutate, message):
        with pytest.raises(ValueError, match=message):
            kernel(*mutate(self.inputs()), scale=0.5)

    @pytest.mark.parametrize("kernel", [gpu.paged_attention, tpu.paged_attention])
    @pytest.mark.parametrize("opts, message", [
        (dict(scale=0.0), "scale"), (dict(scale=1.0, sliding_window=0), "sliding_window"),
        (dict(scale=1.0, logit_softcap=-1.0), "logit_softcap"),
        (dict(scale=1.0, block_sizes=(1, 1)), "block_sizes must be a"),
    ])
    def test_rejects_bad_options(self, kernel, opts, message):
        with pytest.raises(ValueError, match=message):
            kernel(*self.inputs(), **opts)

    def test_gpu_rejects_untileable_shapes(self):
        with pytest.raises(ValueError, match="page_size must be a power of 2"):
            gpu.paged_attention(*self.inputs(page_size=6), scale=1.0)
        with pytest.raises(ValueError, match="dots need at least 16"):
            gpu.paged_attention(*self.inputs(page_size=4), scale=1.0,
                                block_sizes=GpuDecodeBlockSizes(pages_per_block=2))
        with pytest.raises(ValueError, match="over the 4096 limit"):
            gpu.paged_attention(*self.inputs(page_size=64), scale=1.0,
                                block_sizes=GpuDecodeBlockSizes(pages_per_block=128))
        with pytest.raises(ValueError, match="neither"):  # a cache of 24 lanes for q of 16
            q, *rest = self.inputs(head_dim=24)
            gpu.paged_attention(q[..., :16], *rest, scale=1.0)

    @pytest.mark.parametrize("make", [
        lambda: GpuDecodeBlockSizes(pages_per_block=0), lambda: GpuDecodeBlockSizes(pages_per_block=3),
        lambda: GpuDecodeBlockSizes(pages_per_block=2, num_warps=6),
        lambda: GpuDecodeBlockSizes(pages_per_block=2, num_splits=1.5),
        lambda: TpuDecodeBlockSizes(pages_per_block=-1),
    ])
    def test_block_sizes_validate(self, make):
        with pytest.raises(ValueError):
            make()


class TestBlockSizeDefaults:
    def test_h100_p4_shape_uses_measured_tiling(self):
        bs = gpu_decode_block_sizes(head_dim=128, page_size=16, dtype=jnp.bfloat16, batch=64,
                                    num_kv_heads=8, pages_per_seq=128, device_kind="NVIDIA H100 80GB HBM3")
        assert bs.pages_per_block * 16 == 128 and bs.num_splits == 1

    def test_small_batches_split_the_context(self):
        bs = gpu_decode_block_sizes(head_dim=128, page_size=16, dtype=jnp.bfloat16, batch=1,
                                    num_kv_heads=8, pages_per_seq=512, device_kind="NVIDIA H100 80GB HBM3")
        assert bs.num_splits > 1
        assert bs.num_splits * bs.pages_per_block <= 512


def test_merge_splits_is_exact():
    """Merging per-split softmaxes reproduces the softmax over the union; empty splits drop out."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 10))  # [rows, keys]
    values = rng.standard_normal((10, 4))
    full = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)) @ values
    parts, lses = [], []
    for keys in (slice(0, 4), slice(4, 4), slice(4, 10)):
        l = logits[:, keys]
        if l.shape[1] == 0:
            parts.append(np.zeros((3, 4)))
            lses.append(np.full(3, -np.inf))
            continue
        w = np.exp(l)
        parts.append((w / w.sum(1, keepdims=True)) @ values[keys])
        lses.append(np.log(w.sum(1)))
    merged = merge_splits(jnp.asarray(np.stack(parts), jnp.float32), jnp.asarray(np.stack(lses), jnp.float32),
                          jnp.float32)
    np.testing.assert_allclose(merged, full, rtol=1e-5, atol=1e-6)


def test_dispatch_picks_the_backend_kernel():
    case = GPU_CASES[-1]  # default block sizes: valid for whichever kernel is picked
    if jax.default_backend() in ("gpu", "tpu"):
        check_decode_kernel(paged_attention, case, interpret=False, seed=1)
        return
    with pytest.raises(ValueError, match="pass interpret=True"):
        paged_attention(*TestValidation.inputs(), scale=1.0)
    check_decode_kernel(paged_attention, case, interpret=True, seed=1)
