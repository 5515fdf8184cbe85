"""Block sizes for the flash-attention prefill kernels, and the defaults measured per device.

Measurements behind the GPU table: benchmarks/results/flash_attention_* and docs/kernels.md.
"""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.common import check_positive_ints, check_powers_of_2
from pallas_kernels.paged_attention.tuned_block_sizes import device_family


@dataclasses.dataclass(frozen=True)
class GpuFlashBlockSizes:
    """Tiling of the GPU flash-attention kernel.

    block_q: query rows of one head per program (the M of both dots).
    block_k: keys per inner-loop step.
    num_warps, num_stages: Triton launch settings (software-pipelining depth of the key loop).
    All but num_stages are powers of 2 (Triton tensor sizes); block_q and block_k need at least
    16 for the tensor cores.
    """

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_positive_ints(self, "block_q", "block_k", "num_warps", "num_stages")
        check_powers_of_2(self, "block_q", "block_k", "num_warps")


@dataclasses.dataclass(frozen=True)
class TpuFlashBlockSizes:
    """Tiling of the TPU flash-attention kernel.

    block_q: query rows per program (each with the G query heads of one kv head).
    block_k: keys copied into VMEM per step (double-buffered DMA).
    """

    block_q: int
    block_k: int

    def __post_init__(self):
        check_positive_ints(self, "block_q", "block_k")


# (device family, head_dim, dtype) -> (block_q, block_k, num_warps, num_stages).
_GPU_TABLE: dict[tuple[str, int, str], tuple[int, int, int, int]] = {
    ("H100", 128, "bfloat16"): (128, 64, 8, 3),
}
_GPU_FALLBACK = (64, 32, 4, 2)


def gpu_flash_block_sizes(*, head_dim: int, dtype, device_kind: str | None = None) -> GpuFlashBlockSizes:
    key = (device_family(device_kind), head_dim, jax.numpy.dtype(dtype).name)
    return GpuFlashBlockSizes(*_GPU_TABLE.get(key, _GPU_FALLBACK))


def tpu_flash_block_sizes(*, num_tokens: int) -> TpuFlashBlockSizes:
    # Not tuned on a TPU: 128-row query blocks and 512-key DMA steps keep the MXU tiles full
    # and each copy large; tiny inputs get one block.
    return TpuFlashBlockSizes(block_q=min(128, num_tokens), block_k=min(512, num_tokens))
