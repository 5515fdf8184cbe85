"""Launch settings of the rope/KV-write kernel: warps per program.

A program handles one head of one token: two loads of H/2 elements per split-K partial, a
few multiplies, two stores. One warp covers 64 float32 elements in two registers a thread;
more warps only help wider heads. Not swept yet: on the H200 the 8B shape's calls take
1.6 us each at T = 1 with one warp (benchmarks/results/bench_latency_*_2026-12-02_ropekv2*).
"""

from __future__ import annotations


def rope_kv_write_num_warps(head_size: int) -> int:
    """One warp per 128 elements of a head (so per 64 of a half), from 1 to 4."""
    return max(1, min(4, head_size // 128))
