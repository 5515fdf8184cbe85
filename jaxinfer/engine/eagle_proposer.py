"""EAGLE proposals: a one-layer draft head that reads the target's own features.

The target runner keeps every computed token's final hidden state in a feature pool paged like
its KV cache (ModelRunner.keep_features). The head's KV pool has the same page ids, one layer
deep, plus a few scratch pages per proposing request; a request's draft block table is its
target block table followed by its scratch pages. So a position's feature, its target KV and
its draft KV share one slot, and pages found in the prefix cache bring the head's KV and the
features along with the target's.

Per proposal round (every request's last token known, positions 0..N-2 computed by the target):
  1. catch-up: the head runs over the pairs (feature f_p, token x_{p+1}) of the positions it has
     not seen, p < N - 2 (chunked by the step budget), writing its KV;
  2. the pair (f_{N-2}, x_{N-1}) of every request in one forward: its guess f'_{N-1} and the
     target LM head's argmax over it, proposal 1;
  3. k - 1 chained forwards, each feeding the previous guess and proposal on the device, at
     positions N-1, N, ... (their KV lands in the request's own pages or its scratch pages and
     is rewritten from true features by the next round's catch-up).
One transfer brings every proposal to the host. Proposals are greedy: the sampler's
verification assumes deterministic proposals (sampling.py).

What the head reads is only ever a guess: features or head KV that are stale (pages reloaded
from the host tier, copied for a fork) can lower acceptance, never change an output.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.engine.input_batch import PersistentBatch
from jaxinfer.engine.kv_cache import KVCacheSpec, allocate_kv_cache
from jaxinfer.engine.packing import PackSpec, unpack
from jaxinfer.engine.runner import RunnerConfig, _commit_staged, _fed_token_ids, pack_step
from jaxinfer.engine.step_inputs import bucket_for
from jaxinfer.models.eagle import head_dtype
from jaxinfer.models.linear import XLA_LINEAR


def _eagle_step(head_state, target_state, features, kv_cache, packed, prev_ids_r, prev_guess_rd, *, spec: PackSpec,
                from_pool: bool, head_graphdef, target_graphdef, attention, linear):
    """One head forward. Token t pairs the embedding of its token id (or, fed, of the previous
    forward's proposal) with a feature: from the feature pool at its KV slot (`from_pool`) or
    the previous forward's guess of the same row. Returns the argmax proposals and the guesses
    of the logits rows (padded to the rows of prev_ids_r) and the head's KV."""
    token_ids_t, positions_t, metadata, logits_indices_s, feed_t = unpack(packed, spec)
    token_ids_t = _fed_token_ids(token_ids_t, feed_t, prev_ids_r)
    target = nnx.merge(target_graphdef, target_state)
    head = nnx.merge(head_graphdef, head_state)
    t = token_ids_t.shape[0]
    if from_pool:
        features_td = features.reshape(-1, features.shape[-1])[metadata.slot_mapping_t]
    else:
        features_td = prev_guess_rd[jnp.minimum(jnp.arange(t), prev_guess_rd.shape[0] - 1)]
    guesses, kv_cache = head(target.embed_tokens(token_ids_t), features_td, positions_t, kv_cache, metadata,
                             attention, linear)
    rows = guesses[logits_indices_s]
    ids = jnp.argmax(target.compute_logits(rows, linear), axis=-1).astype(jnp.int32)
    pad = prev_ids_r.shape[0] - ids.shape[0]
    return jnp.pad(ids, (0, pad)), jnp.pad(rows, ((0, pad), (0, 0))).astype(prev_guess_rd.dtype), kv_cache


class EagleProposer:
    """Proposes up to k tokens per request with an EAGLE head (see the module docstring).

    Args:
      head_graphdef, head_state: the head (models/eagle.py), in the target's compute dtype.
      target_runner: the target's ModelRunner, keeping features (`keep_features`).
      target_graphdef: the target module's graph definition (its embedding and LM head).
      num_speculative_tokens: the most a request proposes per round (k).
      max_num_seqs, max_model_len, max_num_batched_tokens, page_size, min_token_bucket: the
        engine's limits (the head's steps use the target's token buckets).
      attention: the attention backend; kv_dtype: the cache dtype.
    """

    def __init__(self, head_graphdef, head_state, target_runner, target_graphdef, *, num_speculative_tokens: int,
                 max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int, page_size: int, attention,
                 kv_dtype, min_token_bucket: int, linear=XLA_LINEAR):
        head_config = nnx.merge(head_graphdef, head_state).config
        if target_runner.features is None:
            raise ValueError("the target runner keeps no features: call keep_features() first")
        self.target = target_runner
        self.head_state = head_state
        self.num_pages = target_runner.kv_spec.num_pages
        # Chained positions run at most k - 1 past the last computed token's page.
        self.scratch = -(-(num_speculative_tokens + page_size) // page_size)
        pages_per_seq = -(-max_model_len // page_size)
        kv_spec = KVCacheSpec(1, head_config.num_kv_heads, attention.cache_head_dim(head_config.head_dim), page_size,
                              self.num_pages + max_num_seqs * self.scratch, jnp.dtype(kv_dtype).name)
        placement = target_runner._placement
        self.kv_cache = allocate_kv_cache(kv_spec, sharding=placement)
        self.rows = PersistentBatch(max_num_seqs, pages_per_seq + self.scratch, page_size)
        self.rc = RunnerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                               max_model_len=max_model_len, page_size=page_size, min_token_bucket=min_token_bucket)
        self.max_rows = self.rc.max_logits_rows
        self._done: dict[str, tuple[int, int]] = {}  # request id -> (positions with true pairs, generation)
        self._stages_writes = getattr(attention, "stages_writes", False)
        static = dict(head_graphdef=head_graphdef, target_graphdef=target_graphdef, attention=attention, linear=linear)
        donate = () if self._stages_writes else ("kv_cache",)
        self._step = jax.jit(functools.partial(_eagle_step, **static), static_argnames=("spec", "from_pool"),
                             donate_argnames=donate)
        if self._stages_writes:
            self._commit = jax.jit(functools.partial(_commit_staged, attention=attention), static_argnames=("spec",),
                                   donate_argnums=(0,))
        dtype = head_dtype(head_state)
        self._zero_ids = jax.device_put(np.zeros(self.max_rows, np.int32), placement)
        self._zero_guess = jax.device_put(np.zeros((self.max_rows, head_config.hidden_size), dtype), placement)
        self.chain_buckets = tuple(t for t in self.rc.token_buckets
                                   if t <= bucket_for(max_num_seqs, self.rc.token_buckets))

    # -- warm-up ---------------------------------------------------------------------------
    def warmup(self) -> None:
        """Compiles the head's step for every token bucket (and the chained form for the
        buckets a round's one-token-per-request forwards use)."""
        for t in self.rc.token_buckets:
            jax.block_until_ready(self._forward(t, from_pool=True)[0])
        for t in self.chain_buckets:
            jax.block_until_ready(self._forward(t, from_pool=False)[0])

    # -- rounds ----------------------------------------------------------------------------
    def release(self, keep: set[str]) -> None:
        """Forgets requests not in `keep` (finished, aborted or preempted)."""
        for rid in [r for r in self._done if r not in keep]:
            del self._done[rid]
            self.rows.remove(rid)

    def propose(self, requests: Sequence[tuple[str, Sequence[int], int, int]],
                tables: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
        """requests: (request id, all known tokens, k > 0, generation: its preemption count,
        so a request that restarted computes its head KV again); tables: each one's target
        block table. Returns each request's proposals (none for one token known)."""
        ready = [(rid, known, k, gen) for rid, known, k, gen in requests if len(known) >= 2]
        if not ready:
            return {}
        for i, (rid, known, _, gen) in enumerate(ready):
            first = self.num_pages + i * self.scratch  # this round's scratch pages of the i-th request
            pages = list(tables[rid]) + list(range(first, first + self.scratch))
            if rid in self.rows:
                self.rows.set_pages(rid, pages)
            else:
                self.rows.add(rid, pages)
            done, seen = self._done.get(rid, (0, gen))
            self._done[rid] = (done if seen == gen else 0, gen)
        # 1. Catch-up: every pair but each request's last, chunked by the step budget.
        budget = self.rc.max_num_batched_tokens
        pending = []  # (rid, first position, tokens x_{p+1} of its pairs)
        for rid, known, _, _ in ready:
            start = min(self._done[rid][0], len(known) - 2)
            if start < len(known) - 2:
                pending.append((rid, start, list(known[start + 1:len(known) - 1])))
        while pending:
            ids, starts, lens, tokens, rest = [], [], [], [], []
            room = budget
            for rid, start, pairs in pending:
                n = min(len(pairs), room)
                if n:
                    ids.append(rid)
                    starts.append(start)
                    lens.append(n)
                    tokens.extend(pairs[:n])
                    room -= n
                if n < len(pairs):
                    rest.append((rid, start + n, pairs[n:]))
            self._forward(bucket_for(len(tokens), self.rc.token_buckets), from_pool=True, request_ids=ids,
                          starts=starts, num_tokens=lens, token_ids=tokens)
            pending = rest
        # 2. Each request's last pair: proposal 1.
        rids = [rid for rid, _, _, _ in ready]
        ends = [len(known) for _, known, _, _ in ready]  # N: the first unknown position
        n = len(ready)
        t = bucket_for(n, self.rc.token_buckets)
        proposed, guesses = self._forward(t, from_pool=True, request_ids=rids, starts=[e - 2 for e in ends],
                                          num_tokens=[1] * n, token_ids=[known[-1] for _, known, _, _ in ready],
                                          logits_indices=list(range(n)))
        rounds = [proposed]
        # 3. The chain: position N - 2 + j reads proposal j and the guess that made it.
        for j in range(1, max(k for _, _, k, _ in ready)):
            proposed, guesses = self._forward(t, from_pool=False, request_ids=rids, starts=[e - 2 + j for e in ends],
                                              num_tokens=[1] * n, token_ids=[0] * n, logits_indices=list(range(n)),
                                              feed={i: i for i in range(n)}, prev=(proposed, guesses))
            rounds.append(proposed)
        for rid, end in zip(rids, ends):
            self._done[rid] = (end - 1, self._done[rid][1])
        drafts = np.stack(jax.device_get(rounds))  # [k_max, rows]
        return {rid: drafts[:k, i].tolist() for i, (rid, _, k, _) in enumerate(ready)}

    def _forward(self, t: int, *, from_pool: bool, request_ids=(), starts=(), num_tokens=(), token_ids=(),
                 logits_indices=None, feed: Mapping[int, int] | None = None, prev=None):
        packed, spec = pack_step(self.rows, self.rc, t, request_ids, starts, num_tokens, token_ids, logits_indices,
                                 feed)
        packed = jax.device_put(packed, self.target._placement)
        prev_ids, prev_guess = prev or (self._zero_ids, self._zero_guess)
        target = self.target
        ids, guesses, kv = self._step(self.head_state, target.params, target.features, self.kv_cache, packed,
                                      prev_ids, prev_guess, spec=spec, from_pool=from_pool)
        if self._stages_writes:
            kv = self._commit(self.kv_cache, kv, packed, spec=spec)
        self.kv_cache = kv
        return ids, guesses

