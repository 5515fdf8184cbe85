"""Finishing the fused q|k|v projection (split-K sum, RoPE, k/v written into the stacked
pools): the reference against float64 numpy, then the GPU kernel (Pallas Triton) against the
reference, in interpret mode on any backend and compiled where a GPU exists; and the model
taking the fused path gives the unfused path's numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels.rope_kv_write import fusable_head_size, rope_kv_write, rope_kv_write_reference
from tests.test_paged_attention import lower_for

TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1.6e-2}


def inputs(rng, *, t, kv_heads, group, head, splits, dtype, layers=3, pages=4, page_size=4):
    n = kv_heads * (group + 2) * head
    qkv = rng.standard_normal((splits, t, n) if splits else (t, n))
    angles = rng.uniform(0, 50, (t, head // 2))
    pools = [np.full((kv_heads, layers, pages, page_size, head), np.nan, np.float32) for _ in range(2)]
    slots = rng.permutation(pages * page_size)[:t].astype(np.int32)
    return (jnp.asarray(qkv, jnp.float32 if splits else dtype), jnp.asarray(np.cos(angles), jnp.float32),
            jnp.asarray(np.sin(angles), jnp.float32), *(jnp.asarray(p, dtype) for p in pools), jnp.asarray(slots))


def numpy_rope_kv(qkv, cos, sin, kv_heads, head):
    y = np.asarray(qkv, np.float64)
    y = (y.sum(0) if y.ndim == 3 else y).reshape(y.shape[-2], kv_heads, -1, head)
    c, s = np.asarray(cos, np.float64)[:, None, None], np.asarray(sin, np.float64)[:, None, None]
    x1, x2 = y[..., :head // 2], y[..., head // 2:]
    rot = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return rot[:, :, :-2].reshape(y.shape[0], -1, head), rot[:, :, -2], y[:, :, -1]


def close(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))  # the same slots written
    ok = ~np.isnan(ref)
    err = np.max(np.abs(out[ok] - ref[ok])) / max(np.max(np.abs(ref[ok])), 1e-6)
    assert err <= TOLERANCE[jnp.dtype(dtype)], f"relative error {err:.3g}"


def test_reference_matches_float64():
    rng = np.random.default_rng(0)
    qkv, cos, sin, kp, vp, slots = inputs(rng, t=5, kv_heads=2, group=3, head=16, splits=3, dtype=jnp.float32)
    q, k_pages, v_pages = rope_kv_write_reference(qkv, cos, sin, kp, vp, slots, 1, num_kv_heads=2,
                                                  dtype=jnp.float32)
    q64, k64, v64 = numpy_rope_kv(qkv, cos, sin, 2, 16)
    np.testing.assert_allclose(np.asarray(q), q64, rtol=1e-5, atol=1e-5)
    page, offset = np.asarray(slots) // 4, np.asarray(slots) % 4
    for pages, want in ((k_pages, k64), (v_pages, v64)):
        written = np.asarray(pages)[:, 1, page, offset]  # [K, T, H]
        np.testing.assert_allclose(written, np.swapaxes(want, 0, 1), rtol=1e-5, atol=1e-5)
        untouched = np.ones(pages.shape[1:4], bool)
        untouched[1, page, offset] = False
        assert np.isnan(np.asarray(pages)[:, untouched]).all()  # no other slot or layer written


class RopeKVTests:
    INTERPRET: bool

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("t, kv_heads, group, head, splits", [
        (1, 2, 4, 128, None),   # a decode, the finished product
        (3, 2, 4, 128, 4),      # four partials (the 8B shape's qkv split)
        (6, 1, 1, 16, 2),       # one kv head, one query head per kv head, tiny heads
        (5, 4, 2, 64, 1),
    ])
    def test_matches_reference(self, dtype, t, kv_heads, group, head, splits):
        rng = np.random.default_rng(t * head + (splits or 0))
        qkv, cos, sin, kp, vp, slots = inputs(rng, t=t, kv_heads=kv_heads, group=group, head=head, splits=splits,
                                              dtype=dtype)
        ref = rope_kv_write_reference(qkv, cos, sin, kp, vp, slots, 2, num_kv_heads=kv_heads, dtype=dtype)
        out = rope_kv_write(qkv, cos, sin, jnp.copy(kp), jnp.copy(vp), slots, jnp.int32(2), num_kv_heads=kv_heads,
                            dtype=dtype, interpret=self.INTERPRET)
        assert [(a.shape, a.dtype) for a in out] == [(a.shape, a.dtype) for a in ref]
        for a, b in zip(out, ref):
            close(a, b, dtype)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("kind, stacked", [("llama", True), ("gemma", True), ("llama", False)])
    def test_head_norms_match_reference(self, dtype, kind, stacked):
        """Per-head RMSNorm of the query and key heads before RoPE (Qwen3, Gemma 3): stacked
        weights NaN in every layer but the one written, or one [H] weight."""
        rng = np.random.default_rng(11)
        qkv, cos, sin, kp, vp, slots = inputs(rng, t=3, kv_heads=2, group=2, head=32, splits=2, dtype=dtype)
        norms = []
        for _ in range(2):
            w = np.full((3, 32), np.nan, np.float32)
            w[2] = rng.standard_normal(32)
            norms.append(jnp.asarray(w if stacked else w[2], dtype))
        opts = dict(num_kv_heads=2, dtype=dtype, q_norm=norms[0], k_norm=norms[1], norm_eps=1e-6, norm_kind=kind)
        ref = rope_kv_write_reference(qkv, cos, sin, kp, vp, slots, 2, **opts)
        out = rope_kv_write(qkv, cos, sin, jnp.copy(kp), jnp.copy(vp), slots, jnp.int32(2), interpret=self.INTERPRET,
                            **opts)
        for a, b in zip(out, ref):
            close(a, b, dtype)

    def test_layers_in_a_loop_write_in_place(self):
        """Layers chosen by a loop counter, the pools carried through the loop (as the model's
        scan carries them): each iteration writes its own layer."""
        rng = np.random.default_rng(7)
        qkv, cos, sin, kp, vp, slots = inputs(rng, t=2, kv_heads=2, group=2, head=32, splits=2, dtype=jnp.float32,
                                              layers=4)

        @jax.jit
        def layers(kp, vp):
            def body(i, pools):
                return rope_kv_write(qkv * (i + 1), cos, sin, *pools, slots, 2 * i + 1, num_kv_heads=2,
                                     interpret=self.INTERPRET)[1:]
            return lax.fori_loop(0, 2, body, (kp, vp))

        ref = (kp, vp)
        for i in range(2):
            ref = rope_kv_write_reference(qkv * (i + 1), cos, sin, *ref, slots, 2 * i + 1, num_kv_heads=2)[1:]
        for a, b in zip(layers(kp, vp), ref):
            close(a, b, jnp.float32)


class TestRopeKVInterpret(RopeKVTests):
    INTERPRET = True


if jax.default_backend() == "gpu":
    class TestRopeKVGpu(RopeKVTests):
        INTERPRET = False


@pytest.mark.parametrize("head_norms", [False, True])
def test_lowers_to_triton_with_the_pools_aliased(head_norms):
    s = jax.ShapeDtypeStruct
    pools = s((8, 32, 64, 16, 128), jnp.bfloat16)
    norms = s((32, 128), jnp.bfloat16)

    def fn(y, c, sn, k, v, m, i, qn, kn):
        extra = dict(q_norm=qn, k_norm=kn, norm_kind="gemma") if head_norms else {}
        return rope_kv_write(y, c, sn, k, v, m, i, num_kv_heads=8, dtype=jnp.bfloat16, **extra)

    text = lower_for("cuda", fn, s((4, 16, 6144), jnp.float32), s((16, 64), jnp.float32), s((16, 64), jnp.float32),
                     pools, pools, s((16,), jnp.int32), s((), jnp.int32), norms, norms)
    assert "__gpu$xla.gpu.triton" in text
    assert "output_operand_aliases" in text or "tf.aliasing_output" in text
    assert "stablehlo.scatter" not in text and "stablehlo.dynamic_update_slice" not in text


def test_reference_head_norms_match_float64():
    rng = np.random.default_rng(1)
    qkv, cos, sin, kp, vp, slots = inputs(rng, t=2, kv_heads=1, group=2, head=16, splits=None, dtype=jnp.float32)
    qw, kw = (jnp.asarray(rng.standard_normal((3, 16)), jnp.float32) for _ in range(2))
    q, k_pages, _ = rope_kv_write_reference(qkv, cos, sin, kp, vp, slots, 1, num_kv_heads=1, q_norm=qw, k_norm=kw,
                                            norm_eps=1e-6, norm_kind="gemma")
    y = np.asarray(qkv, np.float64).reshape(2, 1, 4, 16)

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + np.asarray(w[1], np.float64))

    y[:, :, :2] = norm(y[:, :, :2], qw)
    y[:, :, 2] = norm(y[:, :, 2], kw)
    q64, k64, _ = numpy_rope_kv(y.reshape(2, -1), cos, sin, 1, 16)
    np.testing.assert_allclose(np.asarray(q), q64, rtol=1e-5, atol=1e-5)
    page, offset = np.asarray(slots) // 4, np.asarray(slots) % 4
    np.testing.assert_allclose(np.asarray(k_pages)[:, 1, page, offset], np.swapaxes(k64, 0, 1), rtol=1e-5, atol=1e-5)


def test_fusable_head_sizes():
    assert fusable_head_size(128) and fusable_head_size(64) and fusable_head_size(256) and fusable_head_size(16)
    assert not fusable_head_size(96) and not fusable_head_size(80) and not fusable_head_size(8)


@pytest.mark.parametrize("change, message", [
    (dict(qkv=lambda a: a.astype(jnp.bfloat16)), "partials must be float32"),
    (dict(qkv=lambda a: a[..., :-16]), "kv heads x"),
    (dict(cos=lambda a: a[:, :4]), "cos must be"),
    (dict(kp=lambda a: a.astype(jnp.bfloat16), vp=lambda a: a.astype(jnp.bfloat16)), "dtype"),
    (dict(vp=lambda a: a[:, :2]), "equal stacked pools"),
    (dict(slots=lambda a: a[:1]), "slot_mapping"),
    (dict(q_norm=lambda _: jnp.ones(16, jnp.float32)), "go together"),
    (dict(q_norm=lambda _: jnp.ones(8, jnp.float32), k_norm=lambda _: jnp.ones(8, jnp.float32)), "q_norm must be"),
])
@pytest.mark.parametrize("fn", [rope_kv_write, rope_kv_write_reference])
def test_rejects_bad_inputs(fn, change, message):
    names = ("qkv", "cos", "sin", "kp", "vp", "slots")
    args = dict(zip(names, inputs(np.random.default_rng(0), t=3, kv_heads=2, group=2, head=16, splits=2,
                                  dtype=jnp.float32)))
    args.update(q_norm=None, k_norm=None)
    args.update((k, f(args[k])) for k, f in change.items())
    norms = dict(q_norm=args.pop("q_norm"), k_norm=args.pop("k_norm"))
    with pytest.raises(ValueError, match=message):
        fn(*args.values(), 0, num_kv_heads=2, dtype=jnp.float32, **norms)


def test_rejects_head_sizes_the_kernel_does_not_tile():
    qkv, cos, sin, kp, vp, slots = inputs(np.random.default_rng(0), t=2, kv_heads=1, group=1, head=8, splits=None,
                                          dtype=jnp.float32)
    with pytest.raises(ValueError, match="head size 8"):
        rope_kv_write(qkv, cos, sin, kp, vp, slots, 0, num_kv_heads=1, interpret=True)


def test_backend_fuses_decode_sized_steps_of_its_own_pages():
    from jaxinfer.models.paged_attention_pallas import PagedAttentionPallas

    backend = PagedAttentionPallas(platform="gpu", interpret=True)
    pools = (jnp.zeros((2, 3, 4, 4, 64), jnp.bfloat16),) * 2
    limit = backend.fused_qkv_max_tokens
    assert backend.fuses_qkv(pools, 64, jnp.bfloat16, limit)
    assert not backend.fuses_qkv(pools, 64, jnp.bfloat16, limit + 1)  # prefill chunks: XLA's scatter
    assert not backend.fuses_qkv(pools, 64, jnp.float32, 1)  # pages in another dtype (float8 too)
    assert not backend.fuses_qkv(pools, 40, jnp.bfloat16, 1)  # a head kept zero-padded in the cache
    assert not PagedAttentionPallas(platform="tpu").fuses_qkv(pools, 64, jnp.bfloat16, 1)
