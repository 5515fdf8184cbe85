"""fp8 (e4m3) KV cache: on the XLA attention path a step over float8 pools gives what the same
step gives over float32 pools fed keys and values already rounded to e4m3 (the rounding is the
only difference fp8 storage may make); the GPU kernels (interpret mode) read float8 pages as the
reference reads the same values in float32; values past e4m3's range saturate instead of
turning into NaN; and an engine runs with it on both paths alike."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxinfer.engine.kv_cache import KVCacheSpec, allocate_kv_cache
from jaxinfer.models.attention import LayerSpec
from jaxinfer.models.paged_attention_xla import PagedAttentionXLA, to_cache_dtype
from tests.step_inputs_reference import SeqChunk, build_step_inputs

PAGE, K, G, H, L = 4, 2, 2, 16, 1


def rounded(x):
    return jnp.asarray(np.asarray(x).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))


def run_step(pools, q, k, v, md):
    backend = PagedAttentionXLA()
    staged = backend.open_step(pools, q.shape[0])
    out, staged = backend(q, k, v, staged, md, LayerSpec(scale=H ** -0.5), 0)
    return out, backend.commit(pools, backend.close_step(staged, md), md.slot_mapping_t)


def test_fp8_pools_equal_float32_pools_on_rounded_keys():
    rng = np.random.default_rng(0)
    tables = [[3, 5], [7, 2, 9]]
    pools = {dt: allocate_kv_cache(KVCacheSpec(L, K, H, PAGE, 12, dt), fill=float("nan"))
             for dt in ("float8_e4m3fn", "float32")}
    steps = [[SeqChunk([1] * 5, 0, tables[0]), SeqChunk([1] * 7, 0, tables[1])],   # prefill
             [SeqChunk([1], 5, tables[0]), SeqChunk([1], 7, tables[1])]]           # decode over cached pages
    for chunks in steps:
        md = jax.tree.map(jnp.asarray, build_step_inputs(chunks, 16, 4, 3, PAGE).metadata)
        q = jnp.asarray(rng.standard_normal((16, K * G, H)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((16, K, H)) * 3, jnp.float32)
        v = jnp.asarray(rng.standard_normal((16, K, H)) * 3, jnp.float32)
        out8, pools["float8_e4m3fn"] = run_step(pools["float8_e4m3fn"], q, k, v, md)
        ref, pools["float32"] = run_step(pools["float32"], q, rounded(k), rounded(v), md)
        real = int(md.cu_q_lens_s1[md.num_seqs])
        np.testing.assert_allclose(np.asarray(out8)[:real], np.asarray(ref)[:real], rtol=1e-5, atol=1e-5)
    assert pools["float8_e4m3fn"][0].dtype == jnp.float8_e4m3fn


def test_saturates_instead_of_nan():
    x = jnp.asarray([1000.0, -1e6, 3.0])
    out = np.asarray(to_cache_dtype(x, jnp.float8_e4m3fn).astype(jnp.float32))
    np.testing.assert_array_equal(out, [448.0, -448.0, 3.0])


def test_engine_with_fp8_kv_cache():
    from jaxinfer.llm import LLM
    from jaxinfer.sampling_params import SamplingParams
    from tests.engine_fixtures import tiny_model

    llm = LLM(tiny_model(), kv_cache_dtype="fp8", max_model_len=64, num_pages=32, warmup=False)
    assert llm.engine.runner.kv_cache[0].dtype == jnp.float8_e4m3fn
    [out] = llm.generate({"prompt_token_ids": [1, 5, 9, 3]}, SamplingParams(temperature=0.0, max_tokens=6,
                                                                            ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 6
    # The Pallas GPU kernel (interpreted here) reads the same float8 pages: the same tokens.
    pallas = LLM(tiny_model(), kv_cache_dtype="fp8", attention_backend="pallas", max_model_len=64, num_pages=32,
                 warmup=False)
    assert pallas.engine.runner.kv_cache[0].dtype == jnp.float8_e4m3fn
    [out_pallas] = pallas.generate({"prompt_token_ids": [1, 5, 9, 3]},
                                   SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert out_pallas.outputs[0].token_ids == out.outputs[0].token_ids


@pytest.mark.parametrize("kernel", ["ragged", "decode"])
def test_gpu_kernels_read_float8_pages(kernel):
    """The kernels upcast float8 pages after the load: their output equals the float32 reference
    on the same (e4m3-representable) values, NaN-poisoned unused pages included."""
    from pallas_kernels.paged_attention.gpu import paged_attention
    from pallas_kernels.paged_attention.reference import paged_attention_reference
    from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention
    from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference

    rng = np.random.default_rng(1)
    kh, n, h, ps, num_pages = 2, 4, 32, 8, 12
    k = (rng.standard_normal((kh, num_pages, ps, h)) * 2).astype(ml_dtypes.float8_e4m3fn)
    v = (rng.standard_normal((kh, num_pages, ps, h)) * 2).astype(ml_dtypes.float8_e4m3fn)
    k[:, 0], v[:, 0] = np.nan, np.nan  # page 0 is never in a table
    k8, v8 = jnp.asarray(k), jnp.asarray(v)
    k32, v32 = k8.astype(jnp.float32), v8.astype(jnp.float32)
    tables = jnp.asarray([[3, 5, 1, 0], [7, 2, 9, 4]], jnp.int32)
    scale = h ** -0.5
    if kernel == "decode":
        q = jnp.asarray(rng.standard_normal((2, n, h)), jnp.float32)
        lens = jnp.asarray([13, 30], jnp.int32)
        out = paged_attention(q, k8, v8, tables, lens, scale=scale, interpret=True)
        ref = paged_attention_reference(q, k32, v32, tables, lens, scale=scale)
    else:
        q = jnp.asarray(rng.standard_normal((9, n, h)), jnp.float32)
        kv_lens, cu = jnp.asarray([13, 30], jnp.int32), jnp.asarray([0, 8, 9], jnp.int32)
        num_seqs = jnp.asarray([2], jnp.int32)
        out = ragged_paged_attention(q, k8, v8, kv_lens, tables, cu, num_seqs, scale=scale, interpret=True)
        ref = ragged_paged_attention_reference(q, k32, v32, kv_lens, tables, cu, num_seqs, scale=scale)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
