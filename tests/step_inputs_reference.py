"""The chunk-by-chunk builder of a step's inputs: the obviously right reference the engine's
vectorized builder (`PersistentBatch.step_inputs`) is tested against, and a convenient way for
attention tests to lay out steps."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxinfer.engine.step_inputs import StepInputs
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
