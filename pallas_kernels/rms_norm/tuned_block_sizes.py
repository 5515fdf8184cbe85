"""How the fused residual-add RMSNorm kernel walks a row: in chunks of a power of 2 that
divides the width (Triton's tensors have power-of-2 sizes), with enough warps for the chunk.

A program per token row reads S + 1 rows and writes two: a few microseconds at decode sizes,
bound by how many loads are in flight at once (benchmarks/rms_norm.py sweeps warps and chunks).
"""

from __future__ import annotations

import dataclasses

MAX_CHUNK = 4096  # float32 elements a program holds at once (32 per thread at 4 warps)
MIN_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class RmsNormBlockSizes:
    chunk: int       # columns loaded at a time; divides the width
    num_warps: int


def rms_norm_block_sizes(width: int) -> RmsNormBlockSizes | None:
    """The largest power-of-2 chunk (at most MAX_CHUNK) dividing `width`, or None when that is
    below MIN_CHUNK (such widths take the jnp path)."""
    chunk = width & -width  # the largest power of 2 dividing width
    chunk = min(chunk, MAX_CHUNK)
    if chunk < MIN_CHUNK:
        return None
    # Measured on the H200 (benchmarks/results/rms_norm_h200_*): the more threads load a row's
    # S partials at once, the sooner it is done; a whole 4096-wide row with 32 warps (4 elements
    # a thread) beat 8 warps by 30% with 7 partials and 4 warps chunked by 1024 by 2x.
    return RmsNormBlockSizes(chunk=chunk, num_warps=max(4, min(32, chunk // 128)))
