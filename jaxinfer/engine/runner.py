"""The model runner: owns the device state (parameters, KV pools) and runs jitted steps.

One jitted model step per token bucket (sequence slots and block-table width are derived
from it, so they add no compile dimension), the KV pools donated to every step, and a
separate jitted sampler in four variants per batch size (see sampling.py), all compiled at
warm-up. The only device-to-host transfer per step is the sampled token ids (plus logprobs on
request).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer.config import ModelConfig
from jaxinfer.engine.kv_cache import KVCacheSpec, allocate_kv_cache
from jaxinfer.engine.kv_offload import HostKVPool
from jaxinfer.engine.sampling import (VARIANTS, Logprobs, PenaltySlots, SamplerOutput, SamplingMetadata, SamplingRow,
                                      SamplingWidths, prompt_logprobs, sample_packed, sampler_variant)
from jaxinfer.engine.scheduler import SchedulerOutput
from jaxinfer.engine.input_batch import PersistentBatch
from jaxinfer.engine.packing import PackSpec, pack, unpack
from jaxinfer.engine.step_inputs import StepInputs, bucket_for, pow2_buckets
from jaxinfer.models import param_value
from jaxinfer.models.attention import AttentionBackend
from jaxinfer.models.gemma import softcap
from jaxinfer.models.linear import XLA_LINEAR, Linear
from jaxinfer.sampling_params import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger(__name__)


# Prompt logprobs are scored this many token rows at a time (bounds the [rows, V] logits).
SCORE_CHUNK = 256
# Copy-on-write page copies are applied in fixed-size batches so they compile once.
COPY_BATCH = 8


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    page_size: int
    min_token_bucket: int = 8
    # Speculative decoding: most proposed tokens verified in one step, over all its requests
    # (each adds a logits row).
    max_num_spec_tokens: int = 0

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

    @property
    def max_logits_rows(self) -> int:
        return self.max_num_seqs + self.max_num_spec_tokens

    def logits_rows(self, token_bucket: int) -> int:
        """Logits rows of a token bucket: one per sampling sequence, plus one per proposed token."""
        return min(token_bucket, self.max_logits_rows)

    def sampler_sizes(self) -> list[int]:
        return sorted({self.logits_rows(t) for t in self.token_buckets})


def _fed_token_ids(token_ids_t, feed_t, prev_tokens_s):
    """The step's token ids, those of positions sampled by the previous step (still unknown to
    the host when this step was planned: asynchronous scheduling) taken from its device output:
    feed_t[t] >= 0 names the previous step's sampling row."""
    return jnp.where(feed_t >= 0, prev_tokens_s[jnp.maximum(feed_t, 0)], token_ids_t)


def _model_step(state, packed, kv_cache, prev_tokens_s, *, spec: PackSpec, graphdef, attention, linear,
                unroll: bool | int = False):
    """One forward over the step's tokens: logits of the rows that sample, and every token's
    final hidden state (for prompt logprobs, scored only when asked by `_score_prompt`). A pure
    function of the model state: the module is rebuilt from its graph definition at trace time.
    The step's inputs arrive packed in one int32 array (one transfer; see packing.py)."""
    token_ids_t, positions_t, metadata, logits_indices_s, feed_t = unpack(packed, spec)
    model = nnx.merge(graphdef, state)
    token_ids_t = _fed_token_ids(token_ids_t, feed_t, prev_tokens_s)
    hidden, kv_cache = model(token_ids_t, positions_t, kv_cache, metadata, attention, linear, unroll=unroll)
    return model.compute_logits(hidden[logits_indices_s], linear), hidden, kv_cache


def _score_prompt(head, hidden_td, target_ids_t, start, *, linear, rows: int, logit_softcap: float | None = None):
    """`sampling.prompt_logprobs` of rows [start, start + C) of the step, C = min(T, rows):
    targets target_ids_t[start:start + C] under the logits of hidden_td's rows (top
    MAX_LOGPROBS); head is the LM head's weight [V, D] (`_lm_head`), all a scorer reads of the
    model.

    One chunk per call, the host dispatching as many as a step needs: a step's [T, V] float32
    logits at once would need gigabytes (8192 tokens x 128k vocab: 4 GB, times the softmax's
    temporaries)."""
    c = min(hidden_td.shape[0], rows)
    hidden = jax.lax.dynamic_slice_in_dim(hidden_td, start, c, axis=0)
    targets = jax.lax.dynamic_slice_in_dim(target_ids_t, start, c, axis=0)
    logits = softcap(linear(hidden, head, transpose=True, out_dtype=jnp.float32), logit_softcap)  # as compute_logits
    return prompt_logprobs(logits, targets, num_logprobs=MAX_LOGPROBS)


def _lm_head(state):
    """The LM head's weight of a model state (the embedding when tied): what `compute_logits`
    multiplies the final hidden states by."""
    head = param_value(state["lm_head"]) if "lm_head" in state else None
    return head if head is not None else param_value(state["embed"])


def _commit_staged(kv_cache, staged, packed, *, spec: PackSpec, attention):
    """Writes a step's staged k, v (backends with `stages_writes`) at its slot mapping."""
    return attention.commit(kv_cache, staged, unpack(packed, spec)[2].slot_mapping_t)


def pack_step(rows: PersistentBatch, rc: "RunnerConfig", t: int, request_ids=(), starts=(), num_tokens=(),
              token_ids=(), logits_indices=None, feed: Mapping[int, int] | None = None):
    """A step's inputs in one int32 array (and its PackSpec) for a bucket of t tokens, from the
    block-table rows `rows` (unpacked by `unpack` as (token ids, positions, metadata, logits
    indices, feed)). feed: flat token index -> the previous step's sampling row whose token
    goes there."""
    inputs: StepInputs = rows.step_inputs(t, rc.seq_slots(t), request_ids, starts, num_tokens, token_ids,
                                          logits_indices, num_logits=rc.logits_rows(t))
    feed_t = np.full(t, -1, np.int32)
    for index, row in (feed or {}).items():
        feed_t[index] = row
    return pack((inputs.token_ids_t, inputs.positions_t, inputs.metadata, inputs.logits_indices_s, feed_t))


def _store_features(pool, hidden_td, packed, *, spec: PackSpec):
    """Writes each step token's final hidden state at its KV slot of the feature pool
    [pages, page_size, D] (padding tokens land in scratch page 0)."""
    slots = unpack(packed, spec)[2].slot_mapping_t
    flat = pool.reshape(-1, pool.shape[-1]).at[slots].set(hidden_td.astype(pool.dtype))
    return flat.reshape(pool.shape)


def _copy_pages(kv_cache, src_c, dst_c):
    """Copies pages src -> dst in every layer of the stacked pools [K, L, P, page_size, H]."""
    return tuple(pages.at[:, :, dst_c].set(pages[:, :, src_c]) for pages in kv_cache)


class ModelRunner:
    """Runs steps of the model over the paged KV cache and samples their next tokens."""

    def __init__(self, config: ModelConfig, graphdef, params, kv_spec: KVCacheSpec, runner_config: RunnerConfig,
                 attention: AttentionBackend, *, linear: Linear = XLA_LINEAR, eos_token_ids: Sequence[int] = (),
                 kv_fill: float = 0.0, kv_sharding=None, unroll_max_tokens: int = 0, unrolled_params=None,
                 scan_unroll: int = 1, num_host_pages: int = 0):
        if kv_spec.page_size != runner_config.page_size:
            raise ValueError("KV cache and runner disagree on page_size")
        self.config = config
        self.graphdef = graphdef
        self.params = params
        # Steps of at most `unroll_max_tokens` tokens run their layers unrolled (the model's
        # `unroll`; see EngineConfig.scan_layers), over `unrolled_params` when given (per-layer
        # views of `params`) or the stacked `params`; larger steps scan.
        self.unroll_max_tokens = unroll_max_tokens
        self.unrolled_params = unrolled_params
        self.scan_unroll = scan_unroll
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
        # The host-memory KV tier (kv_offload.py): pages the block manager offloads and reloads.
        self.host_kv = HostKVPool(kv_spec, num_host_pages, self._placement, kv_sharding) if num_host_pages else None
        # A backend that stages its writes (the XLA one) gets the pools read-only and returns
        # the step's new k, v, written by a second, donated call; the others update the donated
        # pools in place inside the step.
        self._stages_writes = getattr(attention, "stages_writes", False)
        # On a mesh the steps pin their outputs: the KV pools keep their input sharding, so the
        # donated buffers are reused in place, and logits come back replicated for the sampler.
        # (Inputs need no annotation: jit follows the committed params and pools.)
        step_out, score_out, copy_out = {}, {}, {}  # jit's out_shardings, only on a mesh
        self._logits_sharding = None
        if kv_sharding is not None:
            self._logits_sharding = NamedSharding(kv_sharding.mesh, PartitionSpec())
            # kv_sharding stands as a pytree prefix for the k and v pools; staged writes
            # [L, T, K, H] split their kv heads as the pools do.
            kv_out = kv_sharding
            if self._stages_writes:
                kv_out = NamedSharding(kv_sharding.mesh, PartitionSpec(None, None, kv_sharding.spec[0], None))
            step_out = dict(out_shardings=(self._logits_sharding, self._logits_sharding, kv_out))
            score_out = dict(out_shardings=self._logits_sharding)
            copy_out = dict(out_shardings=kv_sharding)
        static = dict(graphdef=graphdef, attention=attention, linear=linear)
        donate = () if self._stages_writes else ("kv_cache",)
        self._step = jax.jit(functools.partial(_model_step, **static), static_argnames=("spec", "unroll"),
                             donate_argnames=donate, **step_out)
        self._score_chunk = SCORE_CHUNK  # rows per scorer call (fixed when its programs compile)
        self._score = jax.jit(functools.partial(_score_prompt, linear=linear, rows=self._score_chunk,
                                                logit_softcap=config.final_logit_softcap), **score_out)
        if self._stages_writes:
            self._commit = jax.jit(functools.partial(_commit_staged, attention=attention), static_argnames=("spec",),
                                   donate_argnums=(0,), **copy_out)
        self._copy = jax.jit(_copy_pages, donate_argnums=(0,), **copy_out)
        self._batch: dict[str, _CachedRequest] = {}
        # Block tables of the requests being run, one stable row each (preempted ones leave).
        self._rows = PersistentBatch(2 * runner_config.max_num_seqs, runner_config.pages_per_seq,
                                     runner_config.page_size)
        # The previous step's sampled ids on the device, padded to max_logits_rows (the sampler
        # pads them), and each sampling request's row in them: the next step reads tokens the
        # host does not know yet.
        self._prev_tokens = jax.device_put(np.zeros(runner_config.max_logits_rows, np.int32), self._placement)
        self._prev_rows: dict[str, int] = {}
        self._penalties = PenaltySlots(runner_config.max_num_seqs, config.vocab_size, self._placement)
        self.sampling_widths = SamplingWidths()
        self.mask_words = -(-config.vocab_size // 32)  # packed int32 words of a grammar bitmask row
        self._no_grammar_masks: dict[int, jax.Array] = {}  # rows -> all-ones bitmask on the device
        self._greedy_samplers: dict[int, tuple] = {}  # rows -> prepared greedy sampler (`_greedy_sampler`)
        # Ahead-of-time compiled programs by (kind, size[, variant]) (see `precompile`); a step
        # without one goes through the jitted function, which compiles on first use.
        self._executables: dict[tuple, object] = {}
        self._deferred: PendingStep | None = None  # a step whose sampler is not queued yet
        # Every computed token's final hidden state, paged as the KV is (`keep_features`).
        self.features = None

    def keep_features(self) -> None:
        """From now on every step also writes its tokens' final hidden states into a pool
        paged like the KV cache (same page ids and slots), where an EAGLE draft head reads the
        features of any computed position (engine/eagle_proposer.py). Call before warm-up."""
        from jaxinfer.models import param_dtype

        dtype = param_dtype(self.params)  # the dtype hidden states are computed in
        shape = (self.kv_spec.num_pages, self.rc.page_size, self.config.hidden_size)
        self.features = jnp.zeros(shape, dtype, device=self._placement)
        self._store = jax.jit(_store_features, static_argnames=("spec",), donate_argnums=(0,))

    # -- warm-up ---------------------------------------------------------------------------
    @property
    def num_cached_requests(self) -> int:
        """Requests in the persistent batch (finished ones leave at the next step)."""
        return len(self._batch)

    def warmup_plan(self) -> list[tuple[str, int]]:
        """Every (kind, size) compiled at warm-up: per token bucket the model step and the
        prompt-logprob scorer, per sequence-slot count every sampler variant (each applies the
        grammar mask), the page copy and the penalty-history write. Nothing else compiles while
        serving."""
        plan = [("step", t) for t in self.rc.token_buckets]
        slots = self.rc.sampler_sizes()
        plan += [(f"sample_{variant}", s) for s in slots for variant in VARIANTS]
        if self.rc.max_num_spec_tokens:
            plan += [(f"verify_{variant}", s) for s in slots for variant in VARIANTS]
        plan += [("score", t) for t in self.rc.token_buckets]
        plan += [("copy", COPY_BATCH), ("history", 1)]
        if self.host_kv is not None:
            plan.append(("host_transfers", len(self.host_kv.TRANSFER_BATCHES)))
        return plan

    def precompile(self, max_workers: int | None = None) -> int:
        """Compiles the model step and prompt scorer of every token bucket and every sampler
        variant ahead of time, in parallel threads (XLA compiles outside the GIL; with the
        persistent compilation cache on, a warm start loads them in parallel too). The steps
        then run these executables. Returns the number of programs compiled."""
        from concurrent.futures import ThreadPoolExecutor

        def sds(shape, dtype):
            sharding = self._placement
            if not isinstance(sharding, jax.sharding.Sharding):
                sharding = jax.sharding.SingleDeviceSharding(sharding)
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        jobs = []
        for t in self.rc.token_buckets:
            packed, spec = self._pack_step(t)
            args = (self._params_for(t), sds(packed.shape, packed.dtype), self.kv_cache, self._prev_tokens)
            _, hidden, staged = self._step.eval_shape(*args, spec=spec, unroll=False)
            jobs.append((("step", t), functools.partial(
                lambda a, sp, u: self._step.lower(*a, spec=sp, unroll=u).compile(), args, spec, self._unroll(t))))
            # Keyed by the hidden states' rows, which is what a step looks the scorer up by.
            jobs.append((("score", hidden.shape[0]), functools.partial(
                lambda h: self._score.lower(_lm_head(self.params), h, sds((h.shape[0],), np.int32),
                                            sds((), np.int32)).compile(),
                sds(hidden.shape, hidden.dtype))))
            if self._stages_writes:
                jobs.append((("commit", t), functools.partial(
                    lambda st, p, sp: self._commit.lower(self.kv_cache, st, p, spec=sp).compile(),
                    staged, args[1], spec)))
        speculative = (False, True) if self.rc.max_num_spec_tokens else (False,)
        pad_to = self.rc.max_logits_rows
        for size in self.rc.sampler_sizes():
            logits = sds((size, self.config.vocab_size), np.float32)
            for variant, verifies in ((v, sp) for v in VARIANTS for sp in speculative):
                rows = [SamplingRow(SamplingParams(temperature=0.0), [0], [])] * size
                md = SamplingMetadata.build(rows, batch_size=size, vocab_size=self.config.vocab_size,
                                            widths=self.sampling_widths, variant=variant, speculative=verifies)
                packed, spec = pack(md)
                state = self._penalties.state if variant == "full" else None
                jobs.append((("sample", size, variant, verifies), functools.partial(
                    lambda lg, p, st, m, sp: sample_packed.lower(lg, p, st, m, spec=sp, pad_to=pad_to).compile(),
                    logits, sds(packed.shape, packed.dtype), state, sds((size, self.mask_words), np.int32), spec)))
        with ThreadPoolExecutor(max_workers or min(len(jobs), os.cpu_count() or 1)) as pool:
            compiled = list(pool.map(lambda job: job[1](), jobs))
        self._executables.update(zip((key for key, _ in jobs), compiled))
        return len(jobs)

    def warmup(self, progress: bool = True):
        from tqdm.auto import tqdm

        plan = self.warmup_plan()
        hidden_by_bucket = {}  # each step's hidden states, which its bucket's scorer then scores
        for kind, size in tqdm(plan, desc="compiling buckets", disable=not progress, unit="graph"):
            if kind == "step":
                _, hidden_by_bucket[size] = self._run_model(token_bucket=size, with_hidden=True)
            elif kind == "host_transfers":
                self.kv_cache = self.host_kv.warmup(self.kv_cache)
            elif kind == "copy":
                self.copy_pages([])
            elif kind == "history":
                self._penalties.warmup()
            elif kind == "score":
                hidden = hidden_by_bucket.pop(size)
                jax.block_until_ready(self._score_chunks(hidden, np.zeros(hidden.shape[0], np.int32), [0]))
            else:
                rows = [SamplingRow(SamplingParams(temperature=0.0), [0], [])] * size
                # Placed as the step leaves them: the sampler compiles for that.
                logits = jax.device_put(np.zeros((size, self.config.vocab_size), np.float32), self._placement)
                verifies, variant = kind.split("_")
                jax.block_until_ready(self._sample(logits, [f"warmup-{i}" for i in range(size)], rows,
                                                   variant=variant, speculative=verifies == "verify"))

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

    def _run_model(self, request_ids: Sequence[str] = (), starts: Sequence[int] = (),
                   num_tokens: Sequence[int] = (), token_ids: Sequence[int] = (), token_bucket: int | None = None,
                   logits_indices: Sequence[int] | None = None, with_hidden: bool = False,
                   feed: Mapping[int, int] | None = None, before_forward: Callable[[], None] | None = None):
        """Runs the model over the step's tokens (laid out request by request; see
        PersistentBatch.step_inputs). feed: flat token index -> the previous step's sampling row
        whose token goes there."""
        t = token_bucket or bucket_for(len(token_ids), self.rc.token_buckets)
        packed, spec = self._pack_step(t, request_ids, starts, num_tokens, token_ids, logits_indices, feed)
        packed = jax.device_put(packed, self._placement)
        self._before_forward(before_forward)  # may queue the previous sampler: its tokens feed this step
        step = self._executables.get(("step", t)) or functools.partial(self._step, spec=spec, unroll=self._unroll(t))
        logits, hidden, kv_out = step(self._params_for(t), packed, self.kv_cache, self._prev_tokens)
        if self._stages_writes:
            commit = self._executables.get(("commit", t)) or functools.partial(self._commit, spec=spec)
            kv_out = commit(self.kv_cache, kv_out, packed)
        self.kv_cache = kv_out
        if self.features is not None:
            self.features = self._store(self.features, hidden, packed, spec=spec)
        return (logits, hidden) if with_hidden else logits

    @property
    def block_tables(self) -> PersistentBatch:
        """The persistent batch's block-table rows (a caller driving `forward` itself keeps them)."""
        return self._rows

    def forward(self, request_ids: Sequence[str] = (), starts: Sequence[int] = (), num_tokens: Sequence[int] = (),
                token_ids: Sequence[int] = (), logits_indices: Sequence[int] | None = None,
                fed_tokens=None, feed: Mapping[int, int] | None = None, token_bucket: int | None = None):
        """One forward pass over explicitly laid-out tokens (no scheduler output), for a caller
        that plans its own steps (the draft model's proposer); the logits of `logits_indices`.
        fed_tokens: a device array whose row `feed[t]` replaces flat token t (tokens sampled on
        the device that the host has not read)."""
        if fed_tokens is not None:
            self._prev_tokens = fed_tokens
        return self._run_model(request_ids, starts, num_tokens, token_ids, token_bucket=token_bucket,
                               logits_indices=logits_indices, feed=feed)

    def _pack_step(self, t: int, request_ids=(), starts=(), num_tokens=(), token_ids=(), logits_indices=None,
                   feed: Mapping[int, int] | None = None):
        return pack_step(self._rows, self.rc, t, request_ids, starts, num_tokens, token_ids, logits_indices, feed)

    def _unroll(self, t: int) -> bool | int:
        """The model's `unroll` for a step of bucket t: True (a Python loop) for small steps
        when `unroll_max_tokens` says so, else the scan's layers per iteration, with one layer
        as False: `unroll` is a static argument, and 1 == True would share True's executables."""
        if t <= self.unroll_max_tokens:
            return True
        return self.scan_unroll if self.scan_unroll > 1 else False

    def _params_for(self, t: int):
        """The weights a step of bucket t runs on: the per-layer views for unrolled steps."""
        if self.unrolled_params is not None and t <= self.unroll_max_tokens:
            return self.unrolled_params
        return self.params

    def _sample(self, logits_sv, request_ids: Sequence[str], rows: Sequence[SamplingRow],
                variant: str | None = None, speculative: bool | None = None) -> tuple[SamplerOutput, jax.Array]:
        """Samples rows with the cheapest compiled variant that serves them all (or `variant`);
        the tokens also come padded for the next step (see `_run_sampler`)."""
        prepared = self._prepare_sampler(logits_sv.shape[0], request_ids, rows, variant, speculative)
        return self._run_sampler(prepared, logits_sv)

    def _prepare_sampler(self, num_rows: int, request_ids: Sequence[str], rows: Sequence[SamplingRow],
                         variant: str | None = None, speculative: bool | None = None) -> tuple:
        """The host half of sampling: the metadata built, packed and sent to the device. A
        deferred sampler does this when its step is dispatched, so that once the step's grammar
        mask is known only the mask's transfer and one program launch stand between it and the
        sampler."""
        if variant is None and speculative is None and self._all_greedy(rows):
            return self._greedy_sampler(num_rows)
        # Only rows with penalties hold a slot of the penalty state (and only the full sampler
        # has such rows), so the variant is decided once, by `build`.
        slots = (self._penalties.slots_for(request_ids, rows)
                 if any(r is not None and r.params.has_penalties for r in rows) else None)
        md = SamplingMetadata.build(rows, batch_size=num_rows, vocab_size=self.config.vocab_size,
                                    eos_token_ids=self.eos_token_ids, widths=self.sampling_widths,
                                    penalty_slots=slots, variant=variant, speculative=speculative)
        packed, spec = pack(md)
        run = (self._executables.get(("sample", num_rows, md.variant, md.speculative))
               or functools.partial(sample_packed, spec=spec, pad_to=self.rc.max_logits_rows))
        return run, jax.device_put(packed, self._placement), md.variant

    def _all_greedy(self, rows: Sequence[SamplingRow]) -> bool:
        return (all(r is None or r.draft_token_id < 0 for r in rows)
                and sampler_variant(rows, self.eos_token_ids) == "greedy")

    def _greedy_sampler(self, num_rows: int) -> tuple:
        """The prepared greedy sampler for num_rows rows, built once: the greedy program reads
        no per-row parameter (an argmax; draft ids only when it verifies, which this one does
        not), so a batch of greedy rows needs no metadata of its own, and a step saves
        building and sending it (~0.7 ms of host time at 64 rows on the H200)."""
        prepared = self._greedy_samplers.get(num_rows)
        if prepared is None:
            prepared = self._prepare_sampler(num_rows, [], [], variant="greedy", speculative=False)
            self._greedy_samplers[num_rows] = prepared
        return prepared

    def _run_sampler(self, prepared: tuple, logits_sv, bitmask=None) -> tuple[SamplerOutput, jax.Array]:
        """Queues the sampler program: the sampled rows, and their tokens padded to
        max_logits_rows (what the next step reads on the device)."""
        run, packed, variant = prepared
        state = self._penalties.state if variant == "full" else None
        sampled, state, padded = run(logits_sv, packed, state, self._grammar_mask(logits_sv.shape[0], bitmask))
        if variant == "full":
            self._penalties.state = state
        return sampled, padded

    def _grammar_mask(self, num_rows: int, bitmask_rw: np.ndarray | None) -> jax.Array:
        """The sampler's bitmask [S, W] on the device: bitmask_rw [R, W] packs the first R rows'
        allowed tokens (the other rows allow everything; one host-to-device transfer); None:
        every row allows everything (an array kept on the device, so no transfer)."""
        if bitmask_rw is None:
            mask = self._no_grammar_masks.get(num_rows)
            if mask is None:
                mask = jax.device_put(np.full((num_rows, self.mask_words), -1, np.int32), self._placement)
                self._no_grammar_masks[num_rows] = mask
            return mask
        if bitmask_rw.shape[0] < num_rows:
            padding = np.full((num_rows - bitmask_rw.shape[0], self.mask_words), -1, np.int32)  # all allowed
            bitmask_rw = np.concatenate([bitmask_rw, padding])
        return jax.device_put(bitmask_rw, self._placement)

    def _apply_diff(self, out: SchedulerOutput):
        """Brings the persistent batch up to date with the scheduler (see scheduler.py)."""
        for rid in out.finished_req_ids:
            self._batch.pop(rid, None)
            self._rows.remove(rid)
        self._penalties.release(out.finished_req_ids)
        for rid in out.preempted_req_ids:
            self._rows.remove(rid)  # its pages are gone; it comes back with a whole new table
        for r in out.scheduled_new_reqs:
            self._batch[r.request_id] = _CachedRequest(list(r.token_ids), r.num_prompt_tokens)
            self._rows.add(r.request_id, r.block_table)
        for r in out.scheduled_cached_reqs:
            self._batch[r.request_id].token_ids.extend(r.new_token_ids)
            if r.request_id not in self._rows:  # resumed after preemption
                self._rows.add(r.request_id, r.new_page_ids)
            elif r.replaces_block_table:
                self._rows.set_pages(r.request_id, r.new_page_ids)
            elif r.new_page_ids:  # a decode needs a new page once every page_size steps
                self._rows.append_pages(r.request_id, r.new_page_ids)

    def execute(self, out: SchedulerOutput, rows: Sequence[SamplingRow],
                prompt_logprobs: Mapping[str, int] | None = None) -> StepResult:
        """Runs one scheduled step and samples, and waits for the result (see `dispatch`)."""
        return self.dispatch(out, rows, prompt_logprobs).result()

    def dispatch(self, out: SchedulerOutput, rows: Sequence[SamplingRow],
                 prompt_logprobs: Mapping[str, int] | None = None, *, defer_sampling: bool = False,
                 before_forward: Callable[[], None] | None = None) -> PendingStep:
        """Queues one scheduled step and its sampling on the device without waiting for them.

        Args:
          out: the scheduler's output for this step.
          rows: the sampling state of each request in `out.sampling_req_ids`, in that order; a
            request verifying k proposals (`out.spec_token_ids`) has k + 1 rows, the j-th
            carrying its j-th proposal as `draft_token_id` (the last none).
          prompt_logprobs: request id -> top-n, for requests that want prompt logprobs.
          defer_sampling: queue only the forward pass; the caller queues the sampler with
            `sample_deferred` (with a grammar bitmask) before the next forward pass, so the host
            can compute the mask while the forward pass runs.
          before_forward: called once this step's inputs are on their way and before its forward
            pass is queued (for an empty step, before returning): where the caller queues the
            previous step's deferred sampler, whose mask it filled meanwhile.
        Returns:
          The pending step; its `result()` brings the sampled tokens (numpy, rows in
          `sampling_req_ids` order) and prompt logprobs back to the host. A token the host does
          not know yet (sampled by the previous step, under asynchronous scheduling) is read
          from that step's device output.
        """
        if self._deferred is not None and before_forward is None:
            raise RuntimeError("the previous step's sampler was deferred and never queued (sample_deferred)")
        self._apply_diff(out)
        if out.offload_ops or out.reload_ops:  # first: they read pages as they were before this step
            self.kv_cache = self.host_kv.apply(self.kv_cache, out.offload_ops, out.reload_ops)
        if out.total_num_scheduled_tokens == 0:
            self._before_forward(before_forward)
            return PendingStep()  # nothing to run, but finished requests were forgotten above
        if out.copy_ops:
            self.copy_pages(out.copy_ops)
        computed = {r.request_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        computed.update((r.request_id, r.num_computed_tokens) for r in out.scheduled_cached_reqs)
        request_ids = out.scheduled_req_ids
        starts = [computed[rid] for rid in request_ids]
        lens = [out.num_scheduled_tokens[rid] for rid in request_ids]
        token_ids, feed = [], {}
        drafts = out.spec_token_ids
        for rid, start, n in zip(request_ids, starts, lens):
            known = self._batch[rid].token_ids
            proposed = drafts.get(rid, ())
            if start + n - len(proposed) <= len(known):
                token_ids.extend(known[start:start + n - len(proposed)])
                token_ids.extend(proposed)  # verified by the sampler; never part of `known`
                continue
            # Its last token was sampled by the step still in flight: read on the device.
            if proposed or start + n - 1 != len(known) or rid not in self._prev_rows:
                raise RuntimeError(f"request {rid!r}: {start + n - len(known)} unknown tokens, or none in flight")
            token_ids.extend(known[start:])
            feed[len(token_ids)] = self._prev_rows[rid]
            token_ids.append(0)
        wanted = {rid: k for rid, k in (prompt_logprobs or {}).items() if rid in out.num_scheduled_tokens}
        pending = PendingStep()
        # A request verifying k proposals has k + 1 consecutive logits rows.
        logits_indices, row_ids = [], []
        for rid, index in zip(out.sampling_req_ids, out.logits_token_indices):
            k = len(drafts.get(rid, ()))
            logits_indices.extend(range(index, index + k + 1))
            row_ids.extend([rid] * (k + 1))
        if rows and len(rows) != len(row_ids):
            raise ValueError(f"{len(rows)} sampling rows for {len(row_ids)} logits rows")
        run = dict(request_ids=request_ids, starts=starts, num_tokens=lens, token_ids=token_ids,
                   logits_indices=logits_indices, feed=feed, before_forward=before_forward)
        if wanted:
            logits, hidden = self._run_model(**run, with_hidden=True)
            pending.prompt_logprobs, pending.prompt_spans = self._prompt_logprobs(out, starts, lens, hidden, wanted)
        else:
            logits = self._run_model(**run)
        if rows:
            # A request's token for the next step is its last row's (async scheduling never
            # feeds a request that verified proposals: it waits for their outcome).
            self._prev_rows = {rid: i for i, rid in enumerate(row_ids)}
            if defer_sampling:
                pending.deferred = (logits, self._prepare_sampler(logits.shape[0], row_ids, rows))
                self._deferred = pending
            else:
                self._sample_step(pending, logits, row_ids, rows)
        else:
            self._prev_rows = {}
        return pending

    def _before_forward(self, before_forward: Callable[[], None] | None) -> None:
        if before_forward is not None:
            before_forward()
        if self._deferred is not None:
            raise RuntimeError("the previous step's sampler was deferred and never queued (sample_deferred)")

    def sample_deferred(self, pending: PendingStep, bitmask_rw=None) -> None:
        """Queues the sampler of a step dispatched with `defer_sampling` (its metadata already
        on the device), its logits masked by bitmask_rw [rows, ceil(V / 32)] int32 (rows in
        `sampling_req_ids` order); None: no mask."""
        if pending.deferred is None or pending is not self._deferred:
            raise RuntimeError("this step has no deferred sampling outstanding")
        logits, prepared = pending.deferred
        pending.deferred = self._deferred = None
        self._set_sampled(pending, *self._run_sampler(prepared, logits, bitmask_rw))

    def _sample_step(self, pending: PendingStep, logits, request_ids, rows) -> None:
        self._set_sampled(pending, *self._sample(logits, request_ids, rows))

    def _set_sampled(self, pending: PendingStep, sampled: SamplerOutput, padded_tokens) -> None:
        pending.sampled = sampled
        # The next step reads these tokens on the device (asynchronous scheduling).
        self._prev_tokens = padded_tokens

    def _prompt_logprobs(self, out, starts, lens, hidden_td, wanted: Mapping[str, int]):
        """Per request, (first prompt position scored, Logprobs) for this step's prompt tokens.

        Row t of the logits scores the token after t; only targets inside the prompt count.
        """
        targets = np.zeros(hidden_td.shape[0], np.int32)
        spans = {}
        cursor = 0
        for rid, start, n in zip(out.scheduled_req_ids, starts, lens):
            if rid in wanted:
                state = self._batch[rid]
                stop = min(start + n, state.num_prompt_tokens - 1)
                count = max(0, stop - start)
                targets[cursor:cursor + count] = state.token_ids[start + 1:start + 1 + count]
                if count:
                    spans[rid] = (cursor, count, start + 1)
            cursor += n
        c = min(hidden_td.shape[0], self._score_chunk)
        chunks = sorted({i for cursor, count, _ in spans.values()
                         for i in range(cursor // c, (cursor + count - 1) // c + 1)})
        return (c, hidden_td.shape[0], chunks, self._score_chunks(hidden_td, targets, chunks)), spans

    def _score_chunks(self, hidden_td, targets, chunks):
        """Logprobs of each listed chunk of the step's rows (left on the device). Chunk i covers
        rows [chunk_start(i), + c): the last one is moved back to end at the last row, so
        every call scores exactly c rows."""
        t = hidden_td.shape[0]
        c = min(t, self._score_chunk)
        score = self._executables.get(("score", t), self._score)
        head, targets = _lm_head(self.params), jax.device_put(targets, self._placement)
        return [score(head, hidden_td, targets, jax.device_put(np.int32(chunk_start(i, c, t)), self._placement))
                for i in chunks]


def chunk_start(i: int, size: int, total: int) -> int:
    """First row of scoring chunk i of `size` rows over `total` rows (the last one ends at total)."""
    return min(i * size, total - size)


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
    # (rows per chunk, the step's rows, chunk indices, each chunk's Logprobs on the device)
    prompt_logprobs: tuple | None = None
    # request id -> (its first token row, rows scored, position of the first prompt token scored)
    prompt_spans: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    # (logits, prepared sampler) of a sampler not yet queued (`ModelRunner.sample_deferred`)
    deferred: tuple | None = None

    @property
    def deferred_rows(self) -> int:
        """Rows of the deferred sampler: its logits' rows (the sampler's size, which may exceed
        the step's sampling rows)."""
        return self.deferred[0].shape[0]

    def result(self) -> StepResult:
        """Waits for the step and copies its sampled tokens (and logprobs) to the host; requests'
        prompt rows are cut on the host (slicing on the device would compile per span)."""
        if self.deferred is not None:
            raise RuntimeError("the step's sampler was deferred and never queued (sample_deferred)")
        spans = {}
        if self.prompt_logprobs is not None:
            size, total, chunks, parts = self.prompt_logprobs
            host = {i: jax.tree.map(np.asarray, part) for i, part in zip(chunks, parts)}

            def rows(start, count):  # rows [start, start + count) of the step, across chunks
                pieces = []
                for i in range(start // size, (start + count - 1) // size + 1):
                    first = chunk_start(i, size, total)
                    lo, hi = max(start, i * size), min(start + count, (i + 1) * size)
                    pieces.append(jax.tree.map(lambda a: a[lo - first:hi - first], host[i]))
                return jax.tree.map(lambda *a: np.concatenate(a), *pieces)

            spans = {rid: (first, rows(c, k)) for rid, (c, k, first) in self.prompt_spans.items()}
        return StepResult(sampled=None if self.sampled is None else jax.tree.map(np.asarray, self.sampled),
                          prompt_logprobs=spans)


@dataclasses.dataclass
class _CachedRequest:
    """The runner's copy of a scheduled request: all known tokens (its block table is a row of
    the PersistentBatch while it runs)."""

    token_ids: list[int]
    num_prompt_tokens: int
