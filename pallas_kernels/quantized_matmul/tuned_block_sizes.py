"""Tiling of the quantized skinny matmul: tile shapes and the kernel's mode from an H200 sweep
(benchmarks/quantized_matmul.py --sweep), then K split until the grid fills the chip with
about two programs per multiprocessor."""

from __future__ import annotations

from pallas_kernels.matmul.tuned_block_sizes import GpuMatmulBlockSizes, sm_count
from pallas_kernels.paged_attention.tuned_block_sizes import device_family
from pallas_kernels.quantized_matmul.layout import QuantLayout

_PROGRAMS_PER_SM = 2
_MAX_SPLIT_K = 32


def row_unit(layout: QuantLayout, k: int) -> int:
    """block_k must be a multiple of this: a pack block for int4, a group for grouped scales,
    16 (the dot's minimum) for per-channel ones."""
    if layout.kind == "int4":
        return layout.pack_size
    return layout.group_size if layout.group_size < k else 16


def kernel_supports(layout: QuantLayout, k: int, n: int) -> bool:
    """Whether the kernel tiles this weight: every tile it loads is a power of 2 of at least 16
    rows (a segment is a group, or half a pack block; Triton's sizes and the dot's minimum), the
    row unit is too, and n splits into strips of 16."""
    unit = row_unit(layout, k)
    if layout.kind == "int4":
        seg = min(layout.group_size, layout.pack_size // 2)
    else:  # a group, or for per-channel scales a block_k step (a power of 2 the tiling picks)
        seg = layout.group_size if layout.group_size < k else unit
    pow2 = (lambda v: v >= 16 and v & (v - 1) == 0)
    return n % 16 == 0 and pow2(seg) and pow2(unit) and k % unit == 0


def split_to_fill(blocks: int, columns: int, programs: int) -> int:
    """The smallest split of `blocks` K steps (a divisor, at most _MAX_SPLIT_K) that gives
    columns * split >= programs, else the largest such divisor."""
    divisors = [d for d in range(1, min(blocks, _MAX_SPLIT_K) + 1) if blocks % d == 0]
    return next((d for d in divisors if columns * d >= programs), divisors[-1])


def programs_to_fill(device_kind: str | None = None) -> int:
    """Programs a skinny kernel's grid should reach on this device: about two per multiprocessor."""
    return _PROGRAMS_PER_SM * sm_count(device_family(device_kind), device_kind)


def quantized_block_sizes(*, num_tokens: int, k: int, n: int, layout: QuantLayout,
                          device_kind: str | None = None) -> GpuMatmulBlockSizes:
    """The tiling for x [num_tokens, k] @ W [k, n] stored as `layout` on this device.

    From the H200 sweep (benchmarks/results/quantized_matmul_h200_2026-12-01*): at one token
    int4 and fp8 run fastest on CUDA cores ("reduce", see gpu.default_mode) with 256-column
    strips, int8 on tensor cores with W as the dot's B side (swap_ab False); at more tokens
    int8 and fp8 take x @ W with 64-row steps, int4 W^T x^T with 128-row steps. K is split
    until about two programs per multiprocessor run.
    """
    if n % 16:
        raise ValueError(f"the quantized matmul kernel needs n to be a multiple of 16, got {n}")
    unit = row_unit(layout, k)
    if k % unit:
        raise ValueError(f"k = {k} is not a multiple of the layout's row unit {unit} ({layout})")
    reduce = num_tokens == 1 and layout.kind in ("int4", "fp8")
    swap_ab = layout.kind == "int4" and num_tokens > 1
    want_n = 256 if reduce else 128
    block_n = next(b for b in (want_n, 128, 64, 32, 16) if b <= want_n and n % b == 0)
    want_k = 128 if (num_tokens == 1 or layout.kind == "int4") else 64
    block_k = max(unit, want_k)  # unit and want_k are powers of 2 (kernel_supports)
    while k % block_k and block_k > unit:
        block_k //= 2
    blocks = k // block_k
    split_k = split_to_fill(blocks, n // block_n, programs_to_fill(device_kind))
    stages = 3 if num_tokens == 1 or block_k >= 128 and block_n >= 128 else 4
    return GpuMatmulBlockSizes(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4,
                               num_stages=stages, swap_ab=swap_ab)
