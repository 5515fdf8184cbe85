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


@dataclasses.dataclass(frozen=True)
class MosaicFlashBlockSizes:
    """Tiling of the Mosaic GPU flash-attention kernel (mosaic_gpu.py).

    block_q: query rows per compute warpgroup (a CTA has two); a multiple of 64, the M of one
      wgmma.
    block_kv: keys per pipeline step; a multiple of 64.
    num_stages: shared-memory slots for K and V blocks in flight (at least 2).
    """

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2

    def __post_init__(self):
        check_positive_ints(self, "block_q", "block_kv", "num_stages")
        if self.block_q % 64 or self.block_kv % 64:
            raise ValueError(f"block_q and block_kv must be multiples of 64, got {self}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be at least 2, got {self.num_stages}")


# head_dim -> Mosaic GPU tiling (bf16 and fp16 alike); Hopper only, so no device key. Shared
# memory holds Q (2 * block_q rows) and num_stages K and V blocks, under the 227 KB limit.
# 128: measured at P3 (benchmarks/results/flash_attention_h100_2026-11-25_*): 3 stages beat 2
# by 2% in two runs, block_kv 64 is 13% slower. 256: the largest tiling that fits.
_MOSAIC_TABLE: dict[int, MosaicFlashBlockSizes] = {
    128: MosaicFlashBlockSizes(64, 128, 3),
    256: MosaicFlashBlockSizes(64, 64, 2),
}


def mosaic_flash_block_sizes(*, head_dim: int, dtype) -> MosaicFlashBlockSizes:
    del dtype  # the kernel takes 2-byte dtypes only, which tile alike
    return _MOSAIC_TABLE.get(head_dim, MosaicFlashBlockSizes())


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
