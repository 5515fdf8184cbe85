"""Attention backend over the paged cache with the Pallas ragged paged attention kernels.

One kernel launch per layer serves the whole mixed step (prefill chunks and decodes); the
cache write stays a scatter in XLA, fused by the compiler into the step. The GPU variant uses
the Triton lowering, the TPU variant Mosaic TPU; on the CPU either runs in interpret mode
(tests only: it is slow).
"""

from __future__ import annotations

import dataclasses

from jaxinfer.models.attention import LayerSpec
from jaxinfer.models.paged_attention_xla import PagedMetadata, write_kv


@dataclasses.dataclass(frozen=True)
class PagedAttentionPallas:
    """platform: "gpu" or "tpu" (which kernel); interpret: run it in Pallas interpret mode."""

    platform: str = "gpu"
    interpret: bool = False
    name: str = "pallas"

    def __post_init__(self):
        if self.platform not in ("gpu", "tpu"):
            raise ValueError(f"platform must be gpu or tpu, got {self.platform!r}")

    def __call__(self, q_tnh, k_tkh, v_tkh, kv_cache, metadata: PagedMetadata, layer: LayerSpec):
        if self.platform == "gpu":
            from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention
        else:
            from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention
        k_pages, v_pages = write_kv(*kv_cache, k_tkh, v_tkh, metadata.slot_mapping_t)
        o = ragged_paged_attention(q_tnh, k_pages, v_pages, metadata.kv_lens_s, metadata.block_tables_sw,
                                   metadata.cu_q_lens_s1, metadata.num_seqs, scale=layer.scale,
                                   sliding_window=layer.sliding_window, logit_softcap=layer.logit_softcap,
                                   interpret=self.interpret)
        return o, (k_pages, v_pages)
