"""Host-side construction of one step's padded device inputs (numpy only).

A step packs, for each scheduled sequence, the chunk of tokens it computes this step
(a prefill chunk or one decode token) into a flat token axis padded to a bucket size.
Only bucket sizes are static, so the jitted step compiles once per bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxinfer.models.paged_attention_xla import PagedMetadata


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """What one sequence computes in a step.

    token_ids: the tokens computed this step (positions start_pos, start_pos + 1, ...).
    start_pos: tokens already in the cache (num_computed_tokens).
    block_table: the sequence's page ids, covering at least start_pos + len(token_ids) tokens.
    """

    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]


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


def build_step_inputs(chunks: Sequence[SeqChunk], num_tokens_padded: int, num_seqs_padded: int,
                      pages_per_seq: int, page_size: int,
                      logits_indices: Sequence[int] | None = None) -> StepInputs:
    """Packs `chunks` into padded arrays of T = num_tokens_padded tokens and S = num_seqs_padded
    sequence slots with block tables of width pages_per_seq.

    `logits_indices` are the flat token indices whose logits the step returns (padded to S
    rows); by default each chunk's last token."""
    t, s = num_tokens_padded, num_seqs_padded
    n_tok = sum(len(c.token_ids) for c in chunks)
    if n_tok > t or len(chunks) > s:
        raise ValueError(f"step of {n_tok} tokens / {len(chunks)} sequences exceeds padded sizes {t} / {s}")
    token_ids = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    # Padding tokens write into scratch page 0 and are attributed to the last sequence slot;
    # what they compute is discarded, they only must not write anywhere real.
    slot_mapping = np.zeros(t, np.int32)
    token_seq = np.full(t, s - 1, np.int32)
    block_tables = np.zeros((s, pages_per_seq), np.int32)
    kv_lens = np.zeros(s, np.int32)
    cu_q_lens = np.zeros(s + 1, np.int32)
    last_token = np.zeros(s, np.int32)
    cursor = 0
    for i, c in enumerate(chunks):
        n = len(c.token_ids)
        end = c.start_pos + n
        if len(c.block_table) * page_size < end:
            raise ValueError(f"block table of {len(c.block_table)} pages cannot hold {end} tokens")
        if len(c.block_table) > pages_per_seq:
            raise ValueError(f"block table of {len(c.block_table)} pages exceeds width {pages_per_seq}")
        pos = np.arange(c.start_pos, end, dtype=np.int32)
        table = np.asarray(c.block_table, np.int32)
        sl = slice(cursor, cursor + n)
        token_ids[sl] = c.token_ids
        positions[sl] = pos
        slot_mapping[sl] = table[pos // page_size] * page_size + pos % page_size
        token_seq[sl] = i
        block_tables[i, :len(table)] = table
        kv_lens[i] = end
        cursor += n
        cu_q_lens[i + 1] = cursor
        last_token[i] = cursor - 1
    cu_q_lens[len(chunks) + 1:] = cursor
    if logits_indices is not None:
        last_token[:] = 0
        last_token[:len(logits_indices)] = logits_indices
    md = PagedMetadata(slot_mapping_t=slot_mapping, token_seq_t=token_seq, positions_t=positions,
                       block_tables_sw=block_tables, kv_lens_s=kv_lens, cu_q_lens_s1=cu_q_lens,
                       num_seqs=np.int32(len(chunks)))
    return StepInputs(token_ids, positions, md, last_token, n_tok, len(chunks))
