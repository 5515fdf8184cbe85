"""Grouped (mixture-of-experts) matmul: the tile table against a NumPy enumeration, the
reference against float64 NumPy, then the GPU kernel (Pallas Triton) against the reference in
interpret mode on any backend and compiled where a GPU exists, and the MoE layer on the kernel
against a dense float64 model.

Weights the kernel must not read are NaN: every layer but the selected one, and every group
that has no rows, so a tile that reads the wrong group or layer shows up as NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models.linear import Linear
from jaxinfer.models.moe import route, routed_experts
from pallas_kernels.grouped_matmul import (group_tiles, grouped_block_sizes, grouped_matmul, grouped_matmul_reference,
                                           max_tiles, rows_per_tile)
from pallas_kernels.matmul import GpuMatmulBlockSizes
from tests.test_moe_models import _dense_reference
from tests.test_paged_attention import lower_for
from tests.test_skinny_matmul import assert_close


def numpy_tiles(sizes, rows):
    """Each group's rows cut into tiles of `rows`, in group order: (group, start, count)."""
    tiles, start = [], 0
    for g, size in enumerate(sizes):
        for first in range(0, size, rows):
            tiles.append((g, start + first, min(rows, size - first)))
        start += size
    return tiles


def numpy_grouped(x, w, sizes, activation=None):
    """float64 x[p] @ w[g(p)]; rows outside every group are zero."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y = np.zeros((x.shape[0], w.shape[-1]))
    start = 0
    for g, size in enumerate(sizes):
        y[start:start + size] = x[start:start + size] @ w[g]
        start += size
    if activation == "silu":
        gate, up = np.split(y, 2, axis=-1)
        return gate / (1 + np.exp(-gate)) * up
    return y


def poisoned(rng, sizes, k, n, dtype, layers=None, layer=None):
    """Random weights [G, k, n] (or [layers, G, k, n]) with empty groups and other layers NaN."""
    shape = (len(sizes), k, n) if layers is None else (layers, len(sizes), k, n)
    w = rng.normal(size=shape).astype(np.float32) / np.sqrt(k)
    empty = np.asarray(sizes) == 0
    if layers is None:
        w[empty] = np.nan
    else:
        w[:, empty] = np.nan
        w[np.arange(layers) != layer] = np.nan
    return jnp.asarray(w, dtype)


GROUPINGS = [[1], [0, 3, 0, 5], [2, 1, 0, 4, 0, 0, 1, 1], [20, 0, 9, 3], [1] * 8, [40, 1], [0] * 5 + [17],
             [150, 0, 70]]  # (the last: tiles of 64 rows, a prefill's)


class TestTiles:
    @pytest.mark.parametrize("sizes", GROUPINGS, ids=str)
    @pytest.mark.parametrize("extra_rows", [0, 3])
    def test_tiles_enumerate_each_group(self, sizes, extra_rows):
        num_rows = sum(sizes) + extra_rows
        tiles = group_tiles(jnp.asarray(sizes, jnp.int32), num_rows)
        rows = rows_per_tile(num_rows, len(sizes))
        want = numpy_tiles(sizes, rows)
        got = [(int(g), int(s), int(c)) for g, s, c in zip(*tiles) if c > 0]
        assert got == want
        assert tiles.count.shape == (max_tiles(num_rows, len(sizes)),)
        assert np.all(np.asarray(tiles.count)[len(want):] == 0)

    def test_bound_holds_for_every_grouping(self):
        rng = np.random.default_rng(0)
        for _ in range(300):
            groups = int(rng.integers(1, 40))
            num_rows = int(rng.integers(1, 300))
            sizes = rng.multinomial(num_rows, rng.dirichlet(np.full(groups, 0.3)))
            assert len(numpy_tiles(sizes, rows_per_tile(num_rows, groups))) <= max_tiles(num_rows, groups)

    def test_rows_per_tile_follows_the_expected_group(self):
        assert rows_per_tile(2, 8) == 16       # Mixtral, batch 1: a row per group
        assert rows_per_tile(512, 128) == 16   # Qwen3-30B-A3B, batch 64: ~4 rows per group
        assert rows_per_tile(512, 8) == 64     # many rows per group: tiles of 64
        assert rows_per_tile(200, 8) == 32


class TestReference:
    @pytest.mark.parametrize("activation", [None, "silu"])
    def test_matches_float64_numpy(self, activation):
        rng = np.random.default_rng(1)
        sizes = [3, 0, 5, 1]
        x = rng.normal(size=(11, 32)).astype(np.float32)
        w = rng.normal(size=(4, 32, 48)).astype(np.float32)
        got = grouped_matmul_reference(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), activation=activation)
        np.testing.assert_allclose(np.asarray(got), numpy_grouped(x, w, sizes, activation), rtol=1e-5, atol=1e-5)


class GroupedMatmulTests:
    """The kernel against the reference; subclasses set INTERPRET."""

    INTERPRET: bool

    def run(self, x, w, sizes, layer=None, **kw):
        return grouped_matmul(x, w, jnp.asarray(sizes, jnp.int32), layer, interpret=self.INTERPRET, **kw)

    @pytest.mark.parametrize("sizes", GROUPINGS, ids=str)
    @pytest.mark.parametrize("dtype,block_sizes", [
        (jnp.float32, None),
        (jnp.bfloat16, GpuMatmulBlockSizes(32, 16, split_k=2)),
        (jnp.bfloat16, GpuMatmulBlockSizes(16, 32, swap_ab=False)),
    ], ids=["f32-default", "bf16-split2", "bf16-noswap"])
    def test_matches_reference(self, sizes, dtype, block_sizes):
        rng = np.random.default_rng(sum(sizes) + len(sizes))
        k, n = 64, 32
        w = poisoned(rng, sizes, k, n, dtype)
        x = jnp.asarray(rng.normal(size=(sum(sizes) + 2, k)), dtype)  # two rows in no group
        out = self.run(x, w, sizes, block_sizes=block_sizes)
        counted = sum(sizes)
        assert out.shape == (x.shape[0], n) and out.dtype == dtype
        assert_close(out[:counted], grouped_matmul_reference(x, w, jnp.asarray(sizes))[:counted], dtype)

    @pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
    def test_stacked_gated_with_a_traced_layer(self, activation):
        rng = np.random.default_rng(2)
        sizes = [2, 0, 3, 1]
        w = poisoned(rng, sizes, 32, 64, jnp.float32, layers=3, layer=1)
        x = jnp.asarray(rng.normal(size=(6, 32)), jnp.float32)
        out = jax.jit(lambda x, w, layer: self.run(x, w, sizes, layer, activation=activation))(x, w, jnp.int32(1))
        assert out.shape == (6, 32)
        ref = grouped_matmul_reference(x, jnp.where(jnp.isnan(w), 0, w), jnp.asarray(sizes), 1, activation=activation)
        assert_close(out, ref, jnp.float32)

    def test_unsummed_partials_add_up_to_the_product(self):
        rng = np.random.default_rng(3)
        sizes = [4, 4]
        x = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(2, 64, 16)), jnp.float32)
        parts = self.run(x, w, sizes, block_sizes=GpuMatmulBlockSizes(16, 16, split_k=4), sum_partials=False)
        assert parts.shape == (4, 8, 16) and parts.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(parts.sum(0)), numpy_grouped(x, w, sizes), rtol=1e-5, atol=1e-5)


class TestGroupedMatmulInterpret(GroupedMatmulTests):
    INTERPRET = True


if jax.default_backend() == "gpu":
    class TestGroupedMatmul(GroupedMatmulTests):
        INTERPRET = False


class TestLoweringAndTiling:
    def test_stacked_experts_lower_to_triton_without_slicing(self):
        s = jax.ShapeDtypeStruct
        # Mixtral's gate|up stack: 32 layers x 8 experts x 4096 x 28672 (60 GB; 64-bit offsets).
        w = s((32, 8, 4096, 28672), jnp.bfloat16)
        text = lower_for("cuda", lambda x, w, g, layer: grouped_matmul(x, w, g, layer, activation="silu"),
                         s((2, 4096), jnp.bfloat16), w, s((8,), jnp.int32), s((), jnp.int32))
        assert "__gpu$xla.gpu.triton" in text
        assert "stablehlo.dynamic_slice" not in text
        assert "tensor<32x8x4096x28672xbf16>" in text.split("__gpu$xla.gpu.triton")[1].split("\n")[0]

    @pytest.mark.parametrize("rows,groups,k,n,gated", [(2, 8, 4096, 14336, True), (2, 8, 14336, 4096, False),
                                                       (8, 128, 2048, 768, True), (8, 128, 768, 2048, False),
                                                       (512, 128, 768, 2048, False)])
    def test_default_tilings_divide_the_expert_shapes(self, rows, groups, k, n, gated):
        bs = grouped_block_sizes(num_rows=rows, num_groups=groups, k=k, n=n, dtype=jnp.bfloat16, gated=gated,
                                 device_kind="NVIDIA H200")
        assert n % bs.block_n == 0 and k % (bs.block_k * bs.split_k) == 0
        assert not gated or bs.split_k == 1

    def test_rejects_mismatched_inputs(self):
        x = jnp.zeros((4, 32), jnp.float32)
        with pytest.raises(ValueError, match="group_sizes must be"):
            grouped_matmul(x, jnp.zeros((3, 32, 16)), jnp.zeros((2,), jnp.int32), interpret=True)
        with pytest.raises(ValueError, match="features"):
            grouped_matmul(x, jnp.zeros((3, 16, 16)), jnp.zeros((3,), jnp.int32), interpret=True)
        with pytest.raises(ValueError, match="pass the layer index"):
            grouped_matmul(x, jnp.zeros((2, 3, 32, 16)), jnp.zeros((3,), jnp.int32), interpret=True)


@pytest.mark.parametrize("tokens,experts,k,per_layer", [(1, 8, 2, False), (5, 16, 4, True), (20, 6, 3, False)])
def test_moe_layer_on_the_kernel_matches_dense_float64(tokens, experts, k, per_layer):
    """Stacked weights with a traced layer index (the scanned model), or a tuple of per-layer
    arrays (the unrolled model)."""
    rng = np.random.default_rng(tokens + experts)
    d, f, layers = 32, 48, 2
    x = rng.normal(size=(tokens, d)).astype(np.float32)
    logits = (rng.normal(size=(tokens, experts)) * 3 + np.linspace(0, 4, experts)).astype(np.float32)
    w_gate_up = (rng.normal(size=(layers, experts, d, 2, f)) * 0.2).astype(np.float32)
    w_down = (rng.normal(size=(layers, experts, f, d)) * 0.2).astype(np.float32)
    weights, chosen = route(jnp.asarray(logits), k, True)
    linear = Linear(kernel="pallas", interpret=True)
    if per_layer:
        w_gate_up_, w_down_ = tuple(jnp.asarray(w) for w in w_gate_up), tuple(jnp.asarray(w) for w in w_down)
        got = jax.jit(lambda x, wt, ch: routed_experts(x, wt, ch, w_gate_up_, w_down_, 1, linear))(
            jnp.asarray(x), weights, chosen)
    else:
        got = jax.jit(lambda *a: routed_experts(*a, linear=linear))(
            jnp.asarray(x), weights, chosen, jnp.asarray(w_gate_up), jnp.asarray(w_down), jnp.int32(1))
    ref = _dense_reference(x, logits, k, True, w_gate_up[1], w_down[1])
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


def test_table_entries_tile_their_shapes():
    from pallas_kernels.grouped_matmul.gpu import _GROUPED_TABLE

    for (family, rows, k, n, dtype, gated), bs in _GROUPED_TABLE.items():
        assert n % bs.block_n == 0 and k % (bs.block_k * bs.split_k) == 0 and not (gated and bs.split_k > 1)
        if rows == 16:  # reachable: a decode step of a few rows looks it up
            assert grouped_block_sizes(num_rows=2, num_groups=8, k=k, n=n, dtype=dtype, gated=gated,
                                       device_kind=f"NVIDIA {family}") == bs


def test_padding_tokens_reach_no_expert():
    """Tokens the step marks as padding (expert id X) add nothing and leave the real tokens'
    outputs as they are; `real_tokens` reads the padding off either metadata form."""
    import dataclasses as dc

    from jaxinfer.models.attention import ContiguousMetadata
    from jaxinfer.models.llama import real_tokens

    rng = np.random.default_rng(5)
    t, experts, k, d, f = 6, 8, 2, 32, 48
    x = rng.normal(size=(t, d)).astype(np.float32)
    logits = rng.normal(size=(t, experts)).astype(np.float32)
    w_gate_up = (rng.normal(size=(experts, d, 2, f)) * 0.2).astype(np.float32)
    w_down = (rng.normal(size=(experts, f, d)) * 0.2).astype(np.float32)
    weights, chosen = route(jnp.asarray(logits), k, True)
    valid = jnp.asarray([True, True, True, True, False, False])
    linear = Linear(kernel="pallas", interpret=True)
    got = routed_experts(jnp.asarray(x), weights, jnp.where(valid[:, None], chosen, experts), jnp.asarray(w_gate_up),
                         jnp.asarray(w_down), linear=linear)
    ref = _dense_reference(x, logits, k, True, w_gate_up, w_down)
    np.testing.assert_allclose(np.asarray(got)[:4], ref[:4], rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(got)[4:] == 0)

    @dc.dataclass
    class Paged:  # the field real_tokens reads of PagedMetadata
        cu_q_lens_s1: jax.Array

    assert real_tokens(Paged(jnp.asarray([0, 3, 5, 5, 5])), 8).tolist() == [True] * 5 + [False] * 3
    assert real_tokens(ContiguousMetadata(jnp.asarray([[4, 5, -1], [7, -1, -1]])), 6).tolist() == \
        [True, True, False, True, False, False]


def test_moe_engine_on_the_kernels_matches_the_reference_loop():
    """The engine on a routed-expert model with the Pallas kernels (interpret mode): paged
    steps padded to token buckets, padding tokens routed nowhere, layers scanned over stacked
    weights (the GPU's form; per-layer weights: the float64 test above); greedy tokens as the
    contiguous reference loop's (XLA's ragged dot)."""
    from jaxinfer.generate import generate
    from tests.engine_fixtures import tiny_model
    from tests.test_flax_model import LOOP_PROMPTS, _greedy_tokens, _loop_engine

    model = tiny_model(seed=4, name="tiny-moe")
    engine = _loop_engine(model, scan_layers=True, linear_kernel="pallas")
    assert _greedy_tokens(engine) == generate(model, LOOP_PROMPTS, 6)
