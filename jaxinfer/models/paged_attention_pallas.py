"""Attention backend over the paged cache with the Pallas ragged paged attention kernels.

One kernel launch per layer serves the whole mixed step (prefill chunks and decodes); the
cache write stays a scatter in XLA, fused by the compiler into the step. The kernel sees the
stacked pools [K, L, P, page_size, H] whole with the layer index (the GPU kernel adds the
layer's page offset as it reads the tables; the TPU kernel gets the pools as [K, L * P,
page_size, H], a free reshape, and tables offset by layer * P), so it reads the layer's pages
in place, whatever the layer index is at run time. The GPU variant uses
the Triton lowering, the TPU variant Mosaic TPU; on the CPU either runs in interpret mode
(tests only: it is slow).

Tensor parallelism: a Pallas kernel is a per-device program that XLA cannot partition, so on a
mesh the cache write and the kernel run inside `jax.shard_map` over the tp axis. Each device
gets its N/tp query heads, its K/tp kv heads of this step's k/v and of the pools, and the whole
(replicated) step metadata, and runs the unchanged kernel on them: query head n reads kv head
n // G, and with K % tp == 0 a device's query heads and the kv heads they read are on the same
device, with the same group size G = N/K. When tp does not divide K the pools are replicated
(sharding/rules.py), the split would not line up, and the engine uses the XLA path instead.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxinfer.models.attention import LayerSpec, WritesInPlace
from jaxinfer.models.paged_attention_xla import PagedMetadata, write_kv


@dataclasses.dataclass(frozen=True)
class PagedAttentionPallas(WritesInPlace):
    """platform: "gpu" or "tpu" (which kernel); interpret: run it in Pallas interpret mode;
    mesh, axis: with a mesh whose `axis` has more than one device, run per device over that
    axis (the kv heads must split evenly over it)."""

    platform: str = "gpu"
    interpret: bool = False
    name: str = "pallas"
    mesh: Mesh | None = None
    axis: str = "tp"

    def __post_init__(self):
        if self.platform not in ("gpu", "tpu"):
            raise ValueError(f"platform must be gpu or tpu, got {self.platform!r}")

    def cache_head_dim(self, head_dim: int) -> int:
        """The head size of the pages: the Triton kernel tiles powers of 2, so other sizes (40,
        80, 96, ...) are kept zero-padded in the cache and never copied to pad them per step."""
        if self.platform == "gpu":
            from pallas_kernels.paged_attention.gpu import gpu_head_dim

            return gpu_head_dim(head_dim)
        return head_dim

    def __call__(self, q_tnh, k_tkh, v_tkh, kv_cache, metadata: PagedMetadata, layer: LayerSpec, layer_idx):
        run = functools.partial(self._attend, layer=layer)
        layer_idx = jnp.asarray(layer_idx, jnp.int32)
        if self.mesh is None or self.mesh.shape[self.axis] == 1:
            return run(q_tnh, k_tkh, v_tkh, kv_cache, metadata, layer_idx)
        if k_tkh.shape[1] % self.mesh.shape[self.axis]:
            raise ValueError(f"{k_tkh.shape[1]} kv heads do not split over {self.mesh.shape[self.axis]} devices")
        heads = PartitionSpec(None, self.axis, None)
        pools = PartitionSpec(self.axis, None, None, None, None)
        # check_vma off: a pallas_call does not say how its outputs vary over the mesh axis, so
        # the check would reject the split out_specs.
        return jax.shard_map(run, mesh=self.mesh,
                             in_specs=(heads, heads, heads, pools, PartitionSpec(), PartitionSpec()),
                             out_specs=(heads, pools), check_vma=False)(q_tnh, k_tkh, v_tkh, kv_cache, metadata,
                                                                        layer_idx)

    # Steps up to this many tokens take the fused q|k|v finish. It saves kernel launches, which
    # is what matters at decode sizes; a prefill chunk's thousands of tokens would make a tiny
    # program per head per token, where XLA's fused scatter streams them (not measured against
    # each other yet).
    fused_qkv_max_tokens = 256

    def fuses_qkv(self, kv_cache, head_dim: int, dtype, num_tokens: int) -> bool:
        """Whether `attend_qkv` serves this step: the GPU kernel on one device, at most
        `fused_qkv_max_tokens` tokens, pages of the model's own head size and dtype (not
        zero-padded, not float8)."""
        from pallas_kernels.rope_kv_write import fusable_head_size

        k_pages = kv_cache[0]
        return (self.platform == "gpu" and (self.mesh is None or self.mesh.shape[self.axis] == 1)
                and num_tokens <= self.fused_qkv_max_tokens
                and k_pages.shape[-1] == head_dim and fusable_head_size(head_dim)
                and jnp.dtype(k_pages.dtype) == jnp.dtype(dtype))

    def attend_qkv(self, qkv, cos_th, sin_th, kv_cache, metadata: PagedMetadata, layer: LayerSpec, layer_idx, *,
                   num_kv_heads: int, dtype, **head_norms):
        """Attention from the fused q|k|v projection itself (its [T, N] product or float32 split-K
        partials, columns [K, G + 2, H] per kv head) and the step's rotary tables [T, H/2]: one
        kernel sums the partials, rotates q and k and writes k, v into the pages in place (where
        the unfused path runs four or five), then the attention kernel reads them. Only where
        `fuses_qkv`. head_norms: the family's per-head q/k norms (q_norm, k_norm: [H] or
        stacked [L, H] at layer_idx; norm_eps, norm_kind), applied before RoPE. Returns
        (o_tnh, kv_cache)."""
        from pallas_kernels.rope_kv_write import rope_kv_write

        layer_idx = jnp.asarray(layer_idx, jnp.int32)
        q, k_pages, v_pages = rope_kv_write(qkv, cos_th, sin_th, *kv_cache, metadata.slot_mapping_t, layer_idx,
                                            num_kv_heads=num_kv_heads, dtype=dtype, interpret=self.interpret,
                                            **head_norms)
        return self._read(q, k_pages, v_pages, metadata, layer_idx, layer), (k_pages, v_pages)

    def _attend(self, q_tnh, k_tkh, v_tkh, kv_cache, metadata: PagedMetadata, layer_idx, layer: LayerSpec):
        pad = kv_cache[0].shape[-1] - k_tkh.shape[-1]
        if pad:  # the cache is kept at the kernel's head size; the extra lanes stay zero
            k_tkh, v_tkh = (jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in (k_tkh, v_tkh))
        k_pages, v_pages = write_kv(*kv_cache, k_tkh, v_tkh, metadata.slot_mapping_t, layer_idx)
        return self._read(q_tnh, k_pages, v_pages, metadata, layer_idx, layer), (k_pages, v_pages)

    def _read(self, q_tnh, k_pages, v_pages, metadata: PagedMetadata, layer_idx, layer: LayerSpec):
        """The attention kernel over layer `layer_idx` of the written pools."""
        opts = dict(scale=layer.scale, sliding_window=layer.sliding_window, logit_softcap=layer.logit_softcap,
                    interpret=self.interpret)
        md = metadata
        if self.platform == "gpu":  # the stacked pools and the layer index, read in place
            from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention

            return ragged_paged_attention(q_tnh, k_pages, v_pages, md.kv_lens_s, md.block_tables_sw,
                                          md.cu_q_lens_s1, md.num_seqs, layer_idx, **opts)
        from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention

        kh, num_layers, num_pages = k_pages.shape[:3]
        flat = (kh, num_layers * num_pages, *k_pages.shape[3:])
        return ragged_paged_attention(q_tnh, k_pages.reshape(flat), v_pages.reshape(flat), md.kv_lens_s,
                                      md.block_tables_sw + layer_idx * num_pages, md.cu_q_lens_s1, md.num_seqs,
                                      **opts)
