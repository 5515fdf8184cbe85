"""Block sizes for the ragged paged attention kernels, and the defaults measured per device.

Measurements behind the GPU table: benchmarks/results/ and docs/kernels.md.
"""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.common import check_positive_ints, check_powers_of_2, next_power_of_2
from pallas_kernels.paged_attention.tuned_block_sizes import device_family


@dataclasses.dataclass(frozen=True)
class GpuRaggedBlockSizes:
    """Tiling of the GPU ragged kernel (two tile shapes in one launch).

    queries_per_block, pages_per_block: the long-query tile: query tokens of one sequence per
      program and pages gathered per inner step.
    short_query_len, short_pages_per_block: sequences with at most short_query_len queries
      (decodes) get one tile of that many query tokens instead.
    A tile has (query tokens) x Gp rows, Gp = query heads per kv head rounded up to a power of
    2, and needs at least 16 rows for the tensor cores.
    num_warps, num_stages: Triton launch settings.
    """

    queries_per_block: int
    pages_per_block: int
    short_query_len: int
    short_pages_per_block: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        fields = ("queries_per_block", "pages_per_block", "short_query_len", "short_pages_per_block")
        check_positive_ints(self, *fields, "num_warps", "num_stages")
        check_powers_of_2(self, *fields, "num_warps")
        if self.short_query_len > self.queries_per_block:
            raise ValueError(f"short_query_len {self.short_query_len} must not exceed "
                             f"queries_per_block {self.queries_per_block}")


@dataclasses.dataclass(frozen=True)
class TpuRaggedBlockSizes:
    """Tiling of the TPU ragged kernel.

    queries_per_block: query tokens per program (a fixed slice of the T rows).
    pages_per_block: pages copied into VMEM per step (double-buffered DMA).
    """

    queries_per_block: int
    pages_per_block: int

    def __post_init__(self):
        check_positive_ints(self, "queries_per_block", "pages_per_block")


# (device family, head_dim, page_size, dtype) ->
#   (long tile rows, long tokens per block, short tile rows, short tokens per block, warps, stages).
_GPU_TABLE: dict[tuple[str, int, int, str], tuple[int, int, int, int, int, int]] = {
    ("H100", 128, 16, "bfloat16"): (128, 64, 16, 128, 4, 3),
    # H200 sweep (kernels_h200_2026-12-01_run2_token_rows): decodes only 3.81 TB/s wall with
    # 128-token short steps; prefill chunks fastest in 64-row tiles of 32-token steps.
    ("H200", 128, 16, "bfloat16"): (64, 32, 16, 128, 4, 2),
}
_GPU_FALLBACK = (64, 64, 16, 64, 4, 2)


def gpu_ragged_block_sizes(*, group: int, head_dim: int, page_size: int, dtype,
                           device_kind: str | None = None) -> GpuRaggedBlockSizes:
    key = (device_family(device_kind), head_dim, page_size, jax.numpy.dtype(dtype).name)
    rows, tokens, short_rows, short_tokens, num_warps, num_stages = _GPU_TABLE.get(key, _GPU_FALLBACK)
    group_pad = next_power_of_2(group)

    def pages(t):
        return next_power_of_2(max(1, t // page_size))

    return GpuRaggedBlockSizes(
        queries_per_block=max(1, rows // group_pad), pages_per_block=pages(tokens),
        short_query_len=max(1, short_rows // group_pad), short_pages_per_block=pages(short_tokens),
        num_warps=num_warps, num_stages=num_stages)


def tpu_ragged_block_sizes(*, page_size: int, pages_per_seq: int) -> TpuRaggedBlockSizes:
    return TpuRaggedBlockSizes(queries_per_block=32,
                               pages_per_block=max(1, min(pages_per_seq, 512 // page_size)))
