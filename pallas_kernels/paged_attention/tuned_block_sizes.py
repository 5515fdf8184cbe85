"""Block sizes for the paged decode kernels, and the defaults measured per device.

The GPU table is keyed by (device family, head_dim, page_size, dtype) and holds the tokens
gathered per inner step and the Triton launch settings; the number of split-K programs per
(sequence, kv head) is derived from the grid size so that small batches still fill the chip.
Measurements behind the table: benchmarks/results/ and docs/kernels.md.
"""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.common import check_positive_ints, check_powers_of_2, next_power_of_2


@dataclasses.dataclass(frozen=True)
class GpuDecodeBlockSizes:
    """Tiling of the GPU decode kernel.

    pages_per_block: pages gathered per inner-loop step (a power of 2: Triton tensor sizes).
    num_splits: programs sharing one (sequence, kv head) context, merged by log-sum-exp.
    num_warps, num_stages: Triton launch settings (software-pipelining depth of the page loop).
    """

    pages_per_block: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_positive_ints(self, "pages_per_block", "num_splits", "num_warps", "num_stages")
        check_powers_of_2(self, "pages_per_block", "num_warps")


@dataclasses.dataclass(frozen=True)
class TpuDecodeBlockSizes:
    """Tiling of the TPU decode kernel.

    pages_per_block: pages copied into VMEM per step (double-buffered DMA).
    num_splits: programs sharing one (sequence, kv head) context, merged by log-sum-exp.
    """

    pages_per_block: int
    num_splits: int = 1

    def __post_init__(self):
        check_positive_ints(self, "pages_per_block", "num_splits")


# (device family, head_dim, page_size, dtype) -> (tokens per block, num_warps, num_stages).
_GPU_TABLE: dict[tuple[str, int, int, str], tuple[int, int, int]] = {
    ("H100", 128, 16, "bfloat16"): (128, 4, 3),
    ("H100", 128, 32, "bfloat16"): (128, 4, 3),
    ("H100", 128, 64, "bfloat16"): (128, 4, 3),
    # H200 sweep of the token-row gather (kernels_h200_2026-12-01_run2_token_rows): 64 tokens a
    # step, 4 warps, 3 stages read the P4 shape's KV at 4.06 TB/s wall, 4.25 by kernel time.
    ("H200", 128, 16, "bfloat16"): (64, 4, 3),
    ("H200", 128, 32, "bfloat16"): (64, 4, 3),
    ("H200", 128, 64, "bfloat16"): (64, 4, 3),
}
_GPU_FALLBACK = (64, 4, 2)
# Split-K programs are added until the grid has at least this many programs per multiprocessor.
_PROGRAMS_PER_SM = 2
_SM_COUNT = {"H100": 132, "H200": 132}


def device_family(device_kind: str | None = None) -> str:
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    for family in ("H200", "H100"):
        if family in kind:
            return family
    return kind


def num_splits_for(batch: int, num_kv_heads: int, max_blocks: int, family: str) -> int:
    """Enough split-K programs that batch * num_kv_heads * splits fills the chip."""
    sms = _SM_COUNT.get(family, 1)
    want = -(-(_PROGRAMS_PER_SM * sms) // max(1, batch * num_kv_heads))
    return max(1, min(want, max_blocks))


def gpu_decode_block_sizes(*, head_dim: int, page_size: int, dtype, batch: int,
                           num_kv_heads: int, pages_per_seq: int,
                           device_kind: str | None = None) -> GpuDecodeBlockSizes:
    family = device_family(device_kind)
    key = (family, head_dim, page_size, jax.numpy.dtype(dtype).name)
    tokens, num_warps, num_stages = _GPU_TABLE.get(key, _GPU_FALLBACK)
    pages_per_block = next_power_of_2(max(1, tokens // page_size))
    max_blocks = -(-pages_per_seq // pages_per_block)
    return GpuDecodeBlockSizes(
        pages_per_block=pages_per_block,
        num_splits=num_splits_for(batch, num_kv_heads, max_blocks, family),
        num_warps=num_warps, num_stages=num_stages)


def tpu_decode_block_sizes(*, page_size: int, pages_per_seq: int) -> TpuDecodeBlockSizes:
    # A TPU core runs its programs one after another, so splitting one context buys nothing
    # there; 512 tokens per DMA step keeps each copy large.
    return TpuDecodeBlockSizes(pages_per_block=max(1, min(pages_per_seq, 512 // page_size)))
