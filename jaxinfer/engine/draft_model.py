"""Draft-model proposals: a smaller model sharing the target's tokenizer guesses k tokens.

The draft runs greedily (its proposals are deterministic, which the sampler's verification
assumes; see sampling.py) on its own ModelRunner: its own parameters and KV pool, the same
jitted step and attention backend as the target. Its KV pool is split statically: a request
proposing takes a slot of `pages_per_seq` pages for as long as it runs, so the draft never
competes with the target for pages and needs no scheduler.

Per proposal round (before the target's step is scheduled, every request's last token known):
one ragged forward over each proposing request's tokens the draft has not computed yet (its
whole prompt at first, afterwards the tokens accepted since, 1 to k + 1), whose last logits
give the first proposal; then k - 1 one-token forwards, each reading the previous proposal on
the device. One transfer brings all proposals to the host. The draft's KV of positions at and
after the last known token is rewritten by the next round, so rejected proposals leave nothing
behind.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.engine.kv_cache import KVCacheSpec
from jaxinfer.engine.runner import ModelRunner, RunnerConfig


@functools.partial(jax.jit, static_argnames=("rows",))
def _argmax_padded(logits_sv, *, rows: int):
    """Each row's argmax, padded to `rows` (the runner's feed array)."""
    ids = jnp.argmax(logits_sv, axis=1).astype(jnp.int32)
    return jnp.pad(ids, (0, rows - ids.shape[0]))


class DraftModelProposer:
    """Proposes up to k tokens per request with a draft model.

    Args:
      draft: the draft's LoadedModel (parameters on the target's device).
      target_config: the target's ModelConfig (vocabularies must agree).
      max_num_seqs, max_model_len, max_num_batched_tokens, page_size: the engine's limits.
      attention: the attention backend (the target's kind, built for the draft's head size).
      min_token_bucket: the smallest step shape (as the target's runner).
    """

    def __init__(self, draft, target_config, *, max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int,
                 page_size: int, attention, kv_dtype, min_token_bucket: int):
        if draft.config.vocab_size != target_config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                             f"target's ({target_config.vocab_size}); a draft must share the target's tokenizer")
        self.config = draft.config
        self.max_num_seqs = max_num_seqs
        self.pages_per_seq = -(-max_model_len // page_size)
        self.budget = max_num_batched_tokens
        head_dim = attention.cache_head_dim(draft.config.head_dim)
        spec = KVCacheSpec(draft.config.num_layers, draft.config.num_kv_heads, head_dim, page_size,
                           1 + max_num_seqs * self.pages_per_seq, jnp.dtype(kv_dtype).name)
        self.runner = ModelRunner(draft.config, draft.graphdef, draft.params, spec,
                                  RunnerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                               max_model_len=max_model_len, page_size=page_size,
                                               min_token_bucket=min_token_bucket),
                                  attention)
        self._rows = self.runner.block_tables
        self._computed: dict[str, int] = {}  # request id -> positions with the draft's KV
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self._slots: dict[str, int] = {}

    def warmup(self) -> None:
        """Compiles the draft's step for every token bucket and the argmax per slot count."""
        for t in self.runner.rc.token_buckets:
            logits = self.runner.forward(token_bucket=t)
            _argmax_padded(logits, rows=self.runner.rc.max_logits_rows).block_until_ready()

    def release(self, keep: set[str]) -> None:
        """Frees the slots of requests not in `keep` (finished, aborted or preempted: a
        preempted request computes its draft KV again when it returns)."""
        for rid in [r for r in self._slots if r not in keep]:
            self._free_slots.append(self._slots.pop(rid))
            self._computed.pop(rid, None)
            self._rows.remove(rid)

    def propose(self, requests: Sequence[tuple[str, Sequence[int], int]]) -> dict[str, list[int]]:
        """requests: (request id, all known tokens, k > 0). Returns each request's proposals
        (none for a request whose draft is still catching up on a long prompt)."""
        for rid, _, _ in requests:
            if rid not in self._slots:
                slot = self._slots[rid] = self._free_slots.pop()
                first = 1 + slot * self.pages_per_seq
                self._rows.add(rid, range(first, first + self.pages_per_seq))
                self._computed[rid] = 0
        # Catch up: each request's uncomputed tokens, as far as one step's budget allows;
        # requests whose tokens all fit propose this round.
        ids, starts, lens, tokens, last_rows, ready = [], [], [], [], [], []
        budget = self.budget
        for rid, known, k in requests:
            start = self._computed[rid]
            n = min(len(known) - start, budget)
            if n <= 0:
                continue
            budget -= n
            ids.append(rid)
            starts.append(start)
            lens.append(n)
            tokens.extend(known[start:start + n])
            self._computed[rid] = start + n
            if start + n == len(known):
                last_rows.append(len(tokens) - 1)
                ready.append((rid, len(known), k))
        if not ready:
            return {}
        logits = self.runner.forward(request_ids=ids, starts=starts, num_tokens=lens, token_ids=tokens,
                                     logits_indices=last_rows)
        rows = self.runner.rc.max_logits_rows
        proposed = [_argmax_padded(logits, rows=rows)]
        k_max = max(k for _, _, k in ready)
        # Each later round feeds every ready request its previous proposal (row i of the
        # previous argmax) at the next position; requests that want fewer go along anyway.
        for j in range(1, k_max):
            logits = self.runner.forward(
                request_ids=[rid for rid, _, _ in ready], starts=[n + j - 1 for _, n, _ in ready],
                num_tokens=[1] * len(ready), token_ids=[0] * len(ready),
                logits_indices=list(range(len(ready))), fed_tokens=proposed[-1],
                feed={i: i for i in range(len(ready))})
            proposed.append(_argmax_padded(logits, rows=rows))
        # One transfer for all rounds (stacking on the device would compile once per k_max).
        drafts = np.stack(jax.device_get(proposed))  # [k_max, rows]
        return {rid: drafts[:k, i].tolist() for i, (rid, _, k) in enumerate(ready)}
