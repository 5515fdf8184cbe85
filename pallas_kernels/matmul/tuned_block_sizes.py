"""Block sizes for the skinny (decode) matmul kernel, and the defaults measured per device.

The table is keyed by (device family, token bucket, k, n, dtype); the token bucket is the
padded token count max(16, next power of 2 of T). Shapes not in the table get a heuristic
(`fallback_block_sizes`) from a small cost model: read the weight once, fill the chip with
programs, keep enough bytes in flight per multiprocessor, and pay for split-K partials.
Measurements behind the table: benchmarks/matmul.py (`--sweep`) and benchmarks/results/.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.common import check_positive_ints, check_powers_of_2, next_power_of_2
from pallas_kernels.paged_attention.tuned_block_sizes import device_family

MIN_DOT_DIM = 16  # smallest M, N or K of a tensor-core dot in Triton
# Token rows per program: more tokens than this are spread over a token axis of the grid, each
# token block re-reading the weight tiles (from L2 when the blocks run together).
MAX_ROWS_PER_PROGRAM = 64


@dataclasses.dataclass(frozen=True)
class GpuMatmulBlockSizes:
    """Tiling of the GPU skinny-matmul kernel.

    block_n: output features per program; block_n * itemsize bytes are read contiguously from
      each weight row (a power of 2, at least 16: Triton tensor sizes and the dot's minimum).
    block_k: weight rows per inner-loop step (a power of 2, at least 16).
    split_k: programs sharing one column strip, each summing K / split_k rows into float32
      partials that are added outside the kernel (any positive int; 1 writes the output).
    num_warps, num_stages: Triton launch settings (num_stages: software-pipelining depth of
      the K loop, i.e. weight tiles in flight per program).
    swap_ab: compute the [block_n, T] tile as w_tile^T @ x_tile^T rather than [T, block_n] as
      x_tile @ w_tile, so the dot's M side is block_n (>= 64 lets Hopper use wgmma) and the few
      tokens are its N side.
    """

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = True

    def __post_init__(self):
        check_positive_ints(self, "block_n", "block_k", "split_k", "num_warps", "num_stages")
        check_powers_of_2(self, "block_n", "block_k", "num_warps")
        for name in ("block_n", "block_k"):
            if getattr(self, name) < MIN_DOT_DIM:
                raise ValueError(f"GpuMatmulBlockSizes.{name} must be at least {MIN_DOT_DIM} (the "
                                 f"tensor-core dot's minimum), got {getattr(self, name)}")
        if not isinstance(self.swap_ab, bool):
            raise ValueError(f"GpuMatmulBlockSizes.swap_ab must be a bool, got {self.swap_ab!r}")


def token_bucket(num_tokens: int) -> int:
    """The table's token key: max(16, next power of 2 of T) (the padded dot side)."""
    return max(MIN_DOT_DIM, next_power_of_2(num_tokens))


def rows_per_program(num_tokens: int) -> int:
    return min(token_bucket(num_tokens), MAX_ROWS_PER_PROGRAM)


# (device family, token bucket, k, n, dtype) -> measured tiling. Fill from
# `benchmarks/matmul.py --sweep` on the device; anything missing falls back to the heuristic.
# H200 entries: the Llama-3-8B projections, best of the sweep at T = 1 and 16 (bucket 16,
# benchmarks/results/matmul_h200_2026-12-01_run1_sweep.*) and at T = 64 (buckets 32 and 64: deeper
# pipelines and smaller splits, benchmarks/results/matmul_h200_2026-12-02_t64_sweep.*).
_B = GpuMatmulBlockSizes
_H200_8B = {  # (k, n) -> (bucket 16, bucket 64)
    (4096, 6144): (_B(128, 64, 4, 4, 4), _B(64, 64, 1, 4, 8)),      # q|k|v: 3.41 / 3.37 TB/s
    (4096, 4096): (_B(128, 64, 4, 4, 4), _B(64, 64, 2, 4, 8)),      # o: 3.21 / 2.76
    (4096, 28672): (_B(128, 64, 1, 4, 4), _B(128, 64, 1, 8, 5)),    # gate|up: 4.30 / 3.98
    (14336, 4096): (_B(128, 64, 7, 4, 4), _B(64, 128, 2, 4, 4)),    # down: 3.95 / 3.70
}
_GPU_TABLE: dict[tuple[str, int, int, int, str], GpuMatmulBlockSizes] = {
    ("H200", bucket, k, n, "bfloat16"): tiles[0 if bucket == 16 else 1]
    for (k, n), tiles in _H200_8B.items() for bucket in (16, 32, 64)
}

_SM_COUNT = {"H100": 132, "H200": 132}
# The cost model's assumptions (leads, not measurements; the sweep is the judge):
_PROGRAMS_PER_SM = 2             # resident programs per multiprocessor the grid should provide
_SMEM_PER_PROGRAM = 112 * 1024   # pipelined tiles per program: two programs fit in 227 KB
_INFLIGHT_PER_SM = 64 * 1024     # weight bytes in flight per SM to cover HBM latency
_SPLIT_FIXED_BYTES = 4 << 20     # the extra XLA pass summing partials (~1 us), as bytes
_MAX_SPLIT_K = 32


def num_stages_for(block_n: int, block_k: int, rows: int, itemsize: int) -> int:
    """Pipeline depth that keeps one program's weight and x tiles under _SMEM_PER_PROGRAM."""
    stage_bytes = (block_k * block_n + block_k * rows) * itemsize
    return max(2, min(4, _SMEM_PER_PROGRAM // stage_bytes))


def _cost(num_tokens, k, n, itemsize, sms, block_n, block_k, split_k, rows, token_blocks):
    """Relative time of one tiling: bytes moved over the fraction of bandwidth it can use."""
    programs = token_blocks * (n // block_n) * split_k
    steps = k // (block_k * split_k)
    stages = num_stages_for(block_n, block_k, rows, itemsize)
    nbytes = k * n * itemsize
    if split_k > 1:  # float32 partials written once and read once, and one more XLA pass
        nbytes += 2 * split_k * num_tokens * n * 4 + _SPLIT_FIXED_BYTES
    fill = min(1.0, programs / (_PROGRAMS_PER_SM * sms))
    pipeline = steps / (steps + 1)  # each program's first tile is not overlapped
    inflight = min(1.0, (stages - 1) * block_k * block_n * itemsize * _PROGRAMS_PER_SM / _INFLIGHT_PER_SM)
    segment = block_n * itemsize  # contiguous bytes per weight row per tile
    coalescing = 1.0 if segment >= 256 else 0.85 if segment >= 128 else 0.5
    return nbytes / (fill * pipeline * inflight * coalescing)


def fallback_block_sizes(*, num_tokens: int, k: int, n: int, dtype, sms: int, rows: int | None = None,
                         token_blocks: int | None = None, max_split_k: int = _MAX_SPLIT_K) -> GpuMatmulBlockSizes:
    """The cheapest tiling under _cost among those that divide k and n exactly.

    Candidates: block_n and block_k powers of 2 from 128 (32 and 64 for float32, whose exact
    dot runs on CUDA cores from registers) down to 16, split_k any divisor of k / block_k up
    to max_split_k. k and n multiples of 16 always admit block_n = block_k = 16, split_k = 1.
    `rows` (token rows per program) and `token_blocks` (programs along the token axis, each
    reading the weight tiles of its own) default to the skinny kernel's; the grouped kernel
    passes its tile height and expected number of row tiles.
    """
    rows = rows_per_program(num_tokens) if rows is None else rows
    token_blocks = -(-num_tokens // rows) if token_blocks is None else token_blocks
    itemsize = jnp.dtype(dtype).itemsize
    max_n, max_k = (64, 32) if itemsize == 4 else (128, 128)
    best = None
    for block_n in (128, 64, 32, 16):
        if block_n > max_n or n % block_n:
            continue
        for block_k in (128, 64, 32, 16):
            if block_k > max_k or k % block_k:
                continue
            blocks = k // block_k
            for split_k in range(1, min(blocks, max_split_k) + 1):
                if blocks % split_k:
                    continue
                cost = _cost(num_tokens, k, n, itemsize, sms, block_n, block_k, split_k, rows, token_blocks)
                if best is None or cost < best[0] * (1 - 1e-9):  # ties: the earlier candidate
                    best = (cost, block_n, block_k, split_k)
    _, block_n, block_k, split_k = best
    stages = num_stages_for(block_n, block_k, rows, itemsize)
    return GpuMatmulBlockSizes(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4,
                               num_stages=stages)


def sm_count(family: str, device_kind: str | None) -> int:
    """Multiprocessors of the device family; for an unknown GPU read off the device, else 1
    (interpret mode: one program at a time, so the fewest programs run fastest)."""
    if family in _SM_COUNT:
        return _SM_COUNT[family]
    if device_kind is None:
        device = jax.devices()[0]
        if device.platform == "gpu":
            return int(getattr(device, "core_count", 0) or 132)
    return 1


def gpu_matmul_block_sizes(*, num_tokens: int, k: int, n: int, dtype,
                           device_kind: str | None = None) -> GpuMatmulBlockSizes:
    """The tuned tiling for x [num_tokens, k] @ w [k, n] on this device (or `device_kind`),
    else the heuristic's. k and n must be multiples of 16."""
    for name, value in (("num_tokens", num_tokens), ("k", k), ("n", n)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if k % MIN_DOT_DIM or n % MIN_DOT_DIM:
        raise ValueError(f"the skinny matmul kernel needs k and n to be multiples of {MIN_DOT_DIM}, "
                         f"got k={k}, n={n}")
    family = device_family(device_kind)
    key = (family, token_bucket(num_tokens), k, n, jnp.dtype(dtype).name)
    if key in _GPU_TABLE:
        return _GPU_TABLE[key]
    return fallback_block_sizes(num_tokens=num_tokens, k=k, n=n, dtype=dtype,
                                sms=sm_count(family, device_kind))
