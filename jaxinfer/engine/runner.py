"""The model runner: owns the device state (parameters, KV pools) and runs jitted steps.

One jitted model step per token bucket (sequence slots and block-table width are derived
from it, so they add no compile dimension), the KV pools donated to every step, and a
separate jitted sampler whose small graphs compile per sampling-feature combination. The
only device-to-host transfer per step is the sampled token ids (plus logprobs on request).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer.config import ModelConfig
from jaxinfer.engine.kv_cache import KVCacheSpec, allocate_kv_cache
from jaxinfer.engine.sampling import (Logprobs, SamplerOutput, SamplingBuckets, SamplingMetadata, SamplingRow,
                                      sample)
from jaxinfer.engine.sampling import prompt_logprobs as score_prompt
from jaxinfer.engine.scheduler import SchedulerOutput
from jaxinfer.engine.step_inputs import SeqChunk, StepInputs, bucket_for, build_step_inputs, pow2_buckets
from jaxinfer.models.attention import AttentionBackend
from jaxinfer.models.linear import XLA_LINEAR, Linear
from jaxinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Sampler variants compiled at warm-up: the common cases. Penalties, logit bias, min-p and
# logprobs compile on first use (their inner widths are bucketed, see SamplingBuckets).
_WARM_SAMPLERS = {
    "sample_greedy": SamplingParams(temperature=0.0),
    "sample_temperature": SamplingParams(temperature=1.0, seed=0),
    "sample_top_k_top_p": SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=0),
}

# Copy-on-write page copies are applied in fixed-size batches so they compile once.
COPY_BATCH = 8
# Largest step that runs unrolled when the runner has per-layer views: a batch-1 decode, where
# reading the weights is the whole cost; unrolled steps compile 6x slower than scanned ones.
UNROLLED_MAX_TOKENS = 1


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    page_size: int
    min_token_bucket: int = 8

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def token_buckets(self) -> tuple[int, ...]:
        return pow2_buckets(min(self.min_token_bucket, self.max_num_batched_tokens), self.max_num_batched_tokens)

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

    def seq_slots(self, token_bucket: int) -> int:
        """Sequence slots of a token bucket: a step never has more sequences than tokens."""
        return min(token_bucket, self.max_num_seqs)


def _fed_token_ids(token_ids_t, feed_t, prev_tokens_s):
    """The step's token ids, those of positions sampled by the previous step (still unknown to
    the host when this step was planned: asynchronous scheduling) taken from its device output:
    feed_t[t] >= 0 names the previous step's sampling row."""
    return jnp.where(feed_t >= 0, prev_tokens_s[jnp.maximum(feed_t, 0)], token_ids_t)


def _model_step(state, token_ids_t, positions_t, kv_cache, metadata, logits_indices_s, feed_t, prev_tokens_s, *,
                graphdef, attention, linear):
    """One forward over the step's tokens; logits of the rows that sample. A pure function of
    the model state: the module is rebuilt from its graph definition at trace time only."""
    model = nnx.merge(graphdef, state)
    token_ids_t = _fed_token_ids(token_ids_t, feed_t, prev_tokens_s)
    hidden, kv_cache = model(token_ids_t, positions_t, kv_cache, metadata, attention, linear)
    return model.compute_logits(hidden[logits_indices_s], linear), kv_cache


def _model_step_all_logits(state, token_ids_t, positions_t, kv_cache, metadata, logits_indices_s, feed_t,
                           prev_tokens_s, *, graphdef, attention, linear):
    """As _model_step, plus logits of every token (prompt logprobs); compiled only on use."""
    model = nnx.merge(graphdef, state)
    token_ids_t = _fed_token_ids(token_ids_t, feed_t, prev_tokens_s)
    hidden, kv_cache = model(token_ids_t, positions_t, kv_cache, metadata, attention, linear)
    all_logits = model.compute_logits(hidden, linear)
    return all_logits[logits_indices_s], all_logits, kv_cache


def _copy_pages(kv_cache, src_c, dst_c):
    """Copies pages src -> dst in every layer of the stacked pools [K, L, P, page_size, H]."""
    return tuple(pages.at[:, :, dst_c].set(pages[:, :, src_c]) for pages in kv_cache)


class ModelRunner:
    """Runs steps of the model over the paged KV cache and samples their next tokens."""

    def __init__(self, config: ModelConfig, graphdef, params, kv_spec: KVCacheSpec, runner_config: RunnerConfig,
                 attention: AttentionBackend, *, linear: Linear = XLA_LINEAR, eos_token_ids: Sequence[int] = (),
                 kv_fill: float = 0.0, kv_sharding=None, unrolled_params=None):
        if kv_spec.page_size != runner_config.page_size:
            raise ValueError("KV cache and runner disagree on page_size")
        self.config = config
        self.graphdef = graphdef
        self.params = params
        # Per-layer views of `params` for steps of at most UNROLLED_MAX_TOKENS tokens, which then
        # run their layers unrolled (see EngineConfig.scan_layers); None: every step uses params.
        self.unrolled_params = unrolled_params
        self.linear = linear
        self.kv_spec = kv_spec
        self.rc = runner_config
        self.attention = attention
        self.eos_token_ids = tuple(eos_token_ids) or config.eos_token_ids
        # Every array the steps see is committed to its device (or mesh), as jit outputs are: an
        # uncommitted first value would make a program compile a second time for the same shapes.
        self._placement = (NamedSharding(kv_sharding.mesh, PartitionSpec()) if kv_sharding is not None
                           else jax.devices()[0])
        self.kv_cache = allocate_kv_cache(kv_spec, sharding=kv_sharding or self._placement, fill=kv_fill)
        # A backend that stages its writes (the XLA one) gets the pools read-only and returns
        # the step's new k, v, written by a second, donated call; the others update the donated
        # pools in place inside the step.
        self._stages_writes = getattr(attention, "stages_writes", False)
        # On a mesh the steps pin their outputs: the KV pools keep their input sharding, so the
        # donated buffers are reused in place, and logits come back replicated for the sampler.
        # (Inputs need no annotation: jit follows the committed params and pools.)
        step_out, all_out, copy_out = {}, {}, {}  # jit's out_shardings, only on a mesh
        self._logits_sharding = None
        if kv_sharding is not None:
            self._logits_sharding = NamedSharding(kv_sharding.mesh, PartitionSpec())
            # kv_sharding stands as a pytree prefix for the k and v pools; staged writes
            # [L, T, K, H] split their kv heads as the pools do.
            kv_out = kv_sharding
            if self._stages_writes:
                kv_out = NamedSharding(kv_sharding.mesh, PartitionSpec(None, None, kv_sharding.spec[0], None))
            step_out = dict(out_shardings=(self._logits_sharding, kv_out))
            all_out = dict(out_shardings=(self._logits_sharding, self._logits_sharding, kv_out))
            copy_out = dict(out_shardings=kv_sharding)
        static = dict(graphdef=graphdef, attention=attention, linear=linear)
        donate = () if self._stages_writes else ("kv_cache",)
        self._step = jax.jit(functools.partial(_model_step, **static), donate_argnames=donate, **step_out)
        self._step_all_logits = jax.jit(functools.partial(_model_step_all_logits, **static),
                                        donate_argnames=donate, **all_out)
        if self._stages_writes:
            self._commit = jax.jit(attention.commit, donate_argnums=(0,), **copy_out)
        self._copy = jax.jit(_copy_pages, donate_argnums=(0,), **copy_out)
        self._batch: dict[str, _CachedRequest] = {}
        # The previous step's sampled ids on the device, padded to max_num_seqs, and each
        # sampling request's row in them: the next step reads tokens the host does not know yet.
        pad_out = {} if self._logits_sharding is None else dict(out_shardings=self._logits_sharding)
        self._pad_tokens = jax.jit(lambda ids: jnp.pad(ids, (0, runner_config.max_num_seqs - ids.shape[0])),
                                   **pad_out)
        self._prev_tokens = jax.device_put(np.zeros(runner_config.max_num_seqs, np.int32), self._placement)
        self._prev_rows: dict[str, int] = {}

    # -- warm-up ---------------------------------------------------------------------------
    @property
    def num_cached_requests(self) -> int:
        """Requests in the persistent batch (finished ones leave at the next step)."""
        return len(self._batch)

    def warmup_plan(self) -> list[tuple[str, int]]:
        """Every (kind, bucket) compiled at warm-up: the model step per token bucket and the
        greedy and random sampler per sequence-slot count."""
        plan = [("step", t) for t in self.rc.token_buckets]
        slots = sorted({self.rc.seq_slots(t) for t in self.rc.token_buckets})
        plan += [(kind, s) for s in slots for kind in _WARM_SAMPLERS]
        plan.append(("copy", COPY_BATCH))
        return plan

    def warmup(self, progress: bool = True):
        from tqdm.auto import tqdm

        plan = self.warmup_plan()
        for kind, size in tqdm(plan, desc="compiling buckets", disable=not progress, unit="graph"):
            if kind == "step":
                self._run_model([], size)
            elif kind == "copy":
                self.copy_pages([])
            else:
                rows = [SamplingRow(_WARM_SAMPLERS[kind], [0], [])] * size
                # Placed as the step leaves them: the sampler compiles for that.
                logits = jax.device_put(np.zeros((size, self.config.vocab_size), np.float32), self._placement)
                self._pad_tokens(self._sample(logits, rows).token_ids).block_until_ready()

    # -- steps -----------------------------------------------------------------------------
    def copy_pages(self, ops: Sequence[tuple[int, int]]):
        """Applies copy-on-write page copies (src -> dst) to every layer's pools."""
        ops = list(ops) or [(0, 0)]
        for i in range(0, len(ops), COPY_BATCH):
            batch = ops[i:i + COPY_BATCH]
            batch += [(0, 0)] * (COPY_BATCH - len(batch))  # page 0 onto itself: a no-op
            src = np.array([s for s, _ in batch], np.int32)
            dst = np.array([d for _, d in batch], np.int32)
            self.kv_cache = self._copy(self.kv_cache, src, dst)

    def _run_model(self, chunks: Sequence[SeqChunk], token_bucket: int | None = None,
                   logits_indices: Sequence[int] | None = None, all_logits: bool = False,
                   feed: Mapping[int, int] | None = None):
        """feed: flat token index -> the previous step's sampling row whose token goes there."""
        n_tok = sum(len(c.token_ids) for c in chunks)
        t = token_bucket or bucket_for(n_tok, self.rc.token_buckets)
        inputs: StepInputs = build_step_inputs(chunks, t, self.rc.seq_slots(t), self.rc.pages_per_seq,
                                               self.rc.page_size, logits_indices)
        feed_t = np.full(t, -1, np.int32)
        for index, row in (feed or {}).items():
            feed_t[index] = row
        params = self.params
        if self.unrolled_params is not None and t <= UNROLLED_MAX_TOKENS:
            params = self.unrolled_params
        args = (params, inputs.token_ids_t, inputs.positions_t, self.kv_cache, inputs.metadata,
                inputs.logits_indices_s, feed_t, self._prev_tokens)
        if all_logits:
            logits, every, kv_out = self._step_all_logits(*args)
        else:
            (logits, kv_out), every = self._step(*args), None
        if self._stages_writes:
            kv_out = self._commit(self.kv_cache, kv_out, inputs.metadata.slot_mapping_t)
        self.kv_cache = kv_out
        return (logits, every) if all_logits else logits

    def _sample(self, logits_sv, rows: Sequence[SamplingRow | None]):
        md = SamplingMetadata.build(rows, batch_size=logits_sv.shape[0], vocab_size=self.config.vocab_size,
                                    eos_token_ids=self.eos_token_ids)
        return sample(logits_sv, md)

    def _apply_diff(self, out: SchedulerOutput):
        """Brings the persistent batch up to date with the scheduler (see scheduler.py)."""
        for rid in out.finished_req_ids:
            self._batch.pop(rid, None)
        for rid in out.preempted_req_ids:
            state = self._batch.get(rid)
            if state is not None:
                state.block_table.clear()
        for r in out.scheduled_new_reqs:
            self._batch[r.request_id] = _CachedRequest(list(r.token_ids), list(r.block_table), r.num_prompt_tokens)
        for r in out.scheduled_cached_reqs:
            state = self._batch[r.request_id]
            state.token_ids.extend(r.new_token_ids)
            if r.replaces_block_table:
                state.block_table[:] = r.new_page_ids
            else:
                state.block_table.extend(r.new_page_ids)

    def execute(self, out: SchedulerOutput, rows: Sequence[SamplingRow],
                prompt_logprobs: Mapping[str, int] | None = None) -> StepResult:
        """Runs one scheduled step and samples, and waits for the result (see `dispatch`)."""
        return self.dispatch(out, rows, prompt_logprobs).result()

    def dispatch(self, out: SchedulerOutput, rows: Sequence[SamplingRow],
                 prompt_logprobs: Mapping[str, int] | None = None) -> PendingStep:
        """Queues one scheduled step and its sampling on the device without waiting for them.

        Args:
          out: the scheduler's output for this step.
          rows: the sampling state of each request in `out.sampling_req_ids`, in that order.
          prompt_logprobs: request id -> top-n, for requests that want prompt logprobs.
        Returns:
          The pending step; its `result()` brings the sampled tokens (numpy, rows in
          `sampling_req_ids` order) and prompt logprobs back to the host. A token the host does
          not know yet (sampled by the previous step, under asynchronous scheduling) is read
          from that step's device output.
        """
        self._apply_diff(out)
        if out.total_num_scheduled_tokens == 0:
            return PendingStep()  # nothing to run, but finished requests were forgotten above
        if out.copy_ops:
            self.copy_pages(out.copy_ops)
        computed = {r.request_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        computed.update((r.request_id, r.num_computed_tokens) for r in out.scheduled_cached_reqs)
        chunks, feed, cursor = [], {}, 0
        for rid in out.scheduled_req_ids:
            state, start = self._batch[rid], computed[rid]
            n = out.num_scheduled_tokens[rid]
            tokens = state.token_ids[start:start + n]
            if len(tokens) < n:  # its last token was sampled by the step still in flight
                if len(tokens) != n - 1 or rid not in self._prev_rows:
                    raise RuntimeError(f"request {rid!r}: {n - len(tokens)} unknown tokens, or none in flight")
                feed[cursor + n - 1] = self._prev_rows[rid]
                tokens = tokens + [0]
            chunks.append(SeqChunk(tokens, start, state.block_table))
            cursor += n
        wanted = {rid: k for rid, k in (prompt_logprobs or {}).items() if rid in out.num_scheduled_tokens}
        pending = PendingStep()
        if wanted:
            logits, every = self._run_model(chunks, logits_indices=out.logits_token_indices, all_logits=True,
                                            feed=feed)
            pending.prompt_logprobs = self._prompt_logprobs(out, chunks, every, wanted)
        else:
            logits = self._run_model(chunks, logits_indices=out.logits_token_indices, feed=feed)
        if rows:
            pending.sampled = self._sample(logits, rows)
            self._prev_tokens = self._pad_tokens(pending.sampled.token_ids)
            self._prev_rows = {rid: i for i, rid in enumerate(out.sampling_req_ids)}
        else:
            self._prev_rows = {}
        return pending

    def _prompt_logprobs(self, out, chunks, logits_tv, wanted: Mapping[str, int]):
        """Per request, (first prompt position scored, Logprobs) for this step's prompt tokens.

        Row t of the logits scores the token after t; only targets inside the prompt count.
        """
        targets = np.zeros(logits_tv.shape[0], np.int32)
        spans = {}
        cursor = 0
        for rid, chunk in zip(out.scheduled_req_ids, chunks):
            n = len(chunk.token_ids)
            if rid in wanted:
                state = self._batch[rid]
                stop = min(chunk.start_pos + n, state.num_prompt_tokens - 1)
                count = max(0, stop - chunk.start_pos)
                targets[cursor:cursor + count] = state.token_ids[chunk.start_pos + 1:chunk.start_pos + 1 + count]
                if count:
                    spans[rid] = (cursor, count, chunk.start_pos + 1)
            cursor += n
        width = SamplingBuckets().fit("logprobs", max(wanted.values()))
        lp = score_prompt(logits_tv, targets, num_logprobs=width)  # stays on the device until result()
        return {rid: (first, jax.tree.map(lambda a: a[c:c + k], lp)) for rid, (c, k, first) in spans.items()}


@dataclasses.dataclass
class StepResult:
    """What a step brings back to the host."""

    sampled: SamplerOutput | None = None  # rows in sampling_req_ids order
    # request id -> (position of the first prompt token scored, its Logprobs rows)
    prompt_logprobs: dict[str, tuple[int, Logprobs]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PendingStep:
    """A dispatched step: its outputs as device arrays until `result()` fetches them."""

    sampled: SamplerOutput | None = None
    prompt_logprobs: dict = dataclasses.field(default_factory=dict)

    def result(self) -> StepResult:
        """Waits for the step and copies its sampled tokens (and logprobs) to the host."""
        return StepResult(sampled=None if self.sampled is None else jax.tree.map(np.asarray, self.sampled),
                          prompt_logprobs={rid: (first, jax.tree.map(np.asarray, lp))
                                           for rid, (first, lp) in self.prompt_logprobs.items()})


@dataclasses.dataclass
class _CachedRequest:
    """The runner's copy of a scheduled request: all known tokens and its block table."""

    token_ids: list[int]
    block_table: list[int]
    num_prompt_tokens: int
