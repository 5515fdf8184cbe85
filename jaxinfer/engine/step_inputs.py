"""A step's padded device inputs (numpy only) and the token buckets they are padded to.

A step packs, for each scheduled sequence, the chunk of tokens it computes this step
(a prefill chunk or one decode token) into a flat token axis padded to a bucket size.
Only bucket sizes are static, so the jitted step compiles once per bucket. The runner builds
them from its persistent batch (`input_batch.PersistentBatch.step_inputs`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxinfer.models.paged_attention_xla import PagedMetadata


@dataclasses.dataclass
class StepInputs:
    token_ids_t: np.ndarray  # int32 [T]
    positions_t: np.ndarray  # int32 [T]
    metadata: PagedMetadata  # numpy leaves
    logits_indices_s: np.ndarray  # int32 [S]: row of each sequence's last token in T
    num_tokens: int  # valid tokens (<= T)
    num_seqs: int  # valid sequences (<= S)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n (buckets sorted ascending)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def pow2_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """Powers of two from `smallest` up to and including `largest` (itself added if not one)."""
    out, b = [], max(1, smallest)
    while b < largest:
        out.append(b)
        b *= 2
    out.append(largest)
    return tuple(out)
