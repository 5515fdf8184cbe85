"""The runner's persistent batch: preallocated host buffers, one row per running request.

A request takes a row when the runner first schedules it (or when it resumes after
preemption) and keeps it until it finishes or is preempted. Its block table and sampling
parameters are written into the row once and then only extended, so a step's inputs are
gathered from the rows with a few NumPy operations: host work per step grows with the tokens
and sequences of the step, not with the batch's contexts or parameter lists.

Host NumPy only: this module must not import jax.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxinfer.engine.step_inputs import StepInputs
from jaxinfer.models.paged_attention_xla import PagedMetadata


class PersistentBatch:
    """Rows of block tables and sampling parameters for the requests the runner holds.

    Args:
      num_rows: rows available (at least the scheduler's max_num_seqs).
      table_width: block-table columns (pages of the longest sequence).
      page_size: tokens per KV page.
    """

    def __init__(self, num_rows: int, table_width: int, page_size: int):
        self.num_rows = num_rows
        self.table_width = table_width
        self.page_size = page_size
        self.block_tables = np.zeros((num_rows, table_width), np.int32)
        self.num_pages = np.zeros(num_rows, np.int32)
        self._rows: dict[str, int] = {}
        self._free = list(range(num_rows - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._rows

    def row(self, request_id: str) -> int:
        return self._rows[request_id]

    def add(self, request_id: str, block_table: Sequence[int]) -> int:
        if request_id in self._rows:
            raise ValueError(f"request {request_id!r} already has a row")
        if not self._free:
            raise RuntimeError(f"all {self.num_rows} rows of the persistent batch are taken")
        row = self._free.pop()
        self._rows[request_id] = row
        self.set_pages(request_id, block_table)
        return row

    def remove(self, request_id: str) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._free.append(row)

    def set_pages(self, request_id: str, pages: Sequence[int]) -> None:
        """Replaces the request's whole block table."""
        row = self._rows[request_id]
        self.block_tables[row] = 0  # columns past the table read page 0, as padding does
        self.num_pages[row] = 0
        self.append_pages(request_id, pages)

    def append_pages(self, request_id: str, pages: Sequence[int]) -> None:
        row = self._rows[request_id]
        n = int(self.num_pages[row])
        if n + len(pages) > self.table_width:
            raise ValueError(f"block table of {n + len(pages)} pages exceeds width {self.table_width}")
        self.block_tables[row, n:n + len(pages)] = pages
        self.num_pages[row] = n + len(pages)

    def step_inputs(self, num_tokens_padded: int, num_seqs_padded: int, request_ids: Sequence[str],
                    starts: Sequence[int], num_tokens: Sequence[int], token_ids: Sequence[int],
                    logits_indices: Sequence[int] | None = None, num_logits: int | None = None) -> StepInputs:
        """A step's padded inputs (laid out as tests/step_inputs_reference.py does, chunk by chunk).

        Args:
          num_tokens_padded, num_seqs_padded: T and S of the token bucket.
          request_ids: the step's requests, in token order (each must hold a row).
          starts: per request, tokens already in its cache.
          num_tokens: per request, its tokens in the step.
          token_ids: the step's tokens, request after request.
          logits_indices: flat token indices whose logits are returned (default: each
            request's last token).
          num_logits: rows of logits_indices_s (default S; more with speculative decoding).
        Padding tokens write into scratch page 0 and are attributed to the last sequence slot;
        what they compute is discarded.
        """
        t, s = num_tokens_padded, num_seqs_padded
        n_seq, n_tok = len(request_ids), len(token_ids)
        if n_tok > t or n_seq > s:
            raise ValueError(f"step of {n_tok} tokens / {n_seq} sequences exceeds padded sizes {t} / {s}")
        rows = np.fromiter((self._rows[r] for r in request_ids), np.int32, n_seq)
        lens = np.asarray(num_tokens, np.int32).reshape(n_seq)
        if int(lens.sum()) != n_tok:
            raise ValueError(f"{n_tok} token ids for {int(lens.sum())} scheduled tokens")
        ends = np.asarray(starts, np.int32).reshape(n_seq) + lens
        short = np.nonzero(self.num_pages[rows] * self.page_size < ends)[0]
        if short.size:
            i = int(short[0])
            raise ValueError(f"block table of {self.num_pages[rows[i]]} pages cannot hold {ends[i]} tokens")
        cu = np.zeros(s + 1, np.int32)
        np.cumsum(lens, out=cu[1:n_seq + 1])
        cu[n_seq + 1:] = cu[n_seq]
        seq_of_token = np.repeat(np.arange(n_seq, dtype=np.int32), lens)
        positions = np.zeros(t, np.int32)
        positions[:n_tok] = np.repeat(ends - lens - cu[:n_seq], lens) + np.arange(n_tok, dtype=np.int32)
        tokens = np.zeros(t, np.int32)
        tokens[:n_tok] = token_ids
        token_seq = np.full(t, s - 1, np.int32)
        token_seq[:n_tok] = seq_of_token
        slot_mapping = np.zeros(t, np.int32)
        pos = positions[:n_tok]
        slot_mapping[:n_tok] = (self.block_tables[rows[seq_of_token], pos // self.page_size] * self.page_size
                                + pos % self.page_size)
        block_tables = np.zeros((s, self.table_width), np.int32)
        block_tables[:n_seq] = self.block_tables[rows]
        kv_lens = np.zeros(s, np.int32)
        kv_lens[:n_seq] = ends
        last_token = np.zeros(s if num_logits is None else num_logits, np.int32)
        if len(logits_indices if logits_indices is not None else ()) > last_token.shape[0]:
            raise ValueError(f"{len(logits_indices)} logits rows exceed the step's {last_token.shape[0]}")
        if logits_indices is None:
            last_token[:n_seq] = cu[1:n_seq + 1] - 1
        else:
            last_token[:len(logits_indices)] = logits_indices
        md = PagedMetadata(slot_mapping_t=slot_mapping, token_seq_t=token_seq, positions_t=positions,
                           block_tables_sw=block_tables, kv_lens_s=kv_lens, cu_q_lens_s1=cu,
                           num_seqs=np.int32(n_seq))
        return StepInputs(tokens, positions, md, last_token, n_tok, n_seq)
