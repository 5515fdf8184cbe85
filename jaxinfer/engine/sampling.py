"""The batched sampler: one jitted function from a step's logits to its next tokens.

The host packs each request's sampling state into `SamplingMetadata`, arrays of fixed
bucketed shapes; `sample` runs entirely on the device and returns only token ids (and the
logprobs asked for). Processing follows vLLM: logit bias, min-tokens mask, penalties,
temperature, min-p, top-k, top-p, then a Gumbel-max draw. Greedy rows take the argmax of the
processed logits.

Every row draws from its own key, derived from (seed, tokens generated so far), so a seeded
request gets the same tokens whatever else shares its batch and wherever its row sits.

Glossary for shapes: B rows (a bucket size; rows past the real ones are padding), V vocab,
L logit-bias entries, M banned ids, H past (prompt or output) ids, T prompt positions,
N top logprobs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.sampling_params import GREEDY_TEMPERATURE, MAX_LOGPROBS, SamplingParams


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(1 << i for i in range(lo.bit_length() - 1, hi.bit_length()))


@dataclasses.dataclass(frozen=True)
class SamplingBuckets:
    """Allowed padded sizes of the metadata's inner dimensions (sorted ascending).

    Shapes only take these values, so the sampler compiles once per (batch bucket, these
    buckets actually used, flags) and warm-up can cover them all.
    """

    logit_bias: tuple[int, ...] = (1, 16, 128, 1024)
    banned_ids: tuple[int, ...] = (1, 8, 64)
    history: tuple[int, ...] = _powers_of_two(64, 1 << 17)
    logprobs: tuple[int, ...] = (0, 5, MAX_LOGPROBS)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            sizes = getattr(self, field.name)
            if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 0:
                raise ValueError(f"SamplingBuckets.{field.name} must be distinct non-negative "
                                 f"sizes in ascending order, got {sizes}")
        if self.logprobs[-1] < MAX_LOGPROBS:
            raise ValueError(f"SamplingBuckets.logprobs must reach {MAX_LOGPROBS}, got {self.logprobs}")

    def fit(self, name: str, size: int) -> int:
        """The smallest `name` bucket holding `size` entries."""
        for bucket in getattr(self, name):
            if bucket >= size:
                return bucket
        raise ValueError(f"{size} {name} entries exceed the largest bucket "
                         f"({getattr(self, name)[-1]}); raise SamplingBuckets.{name}")


@dataclasses.dataclass(frozen=True)
class SamplingRow:
    """Host-side sampling state of one request in the batch.

    `output_token_ids` are the tokens generated so far that the host knows; with
    `num_pending_outputs` (tokens sampled by steps still in flight) their count is the step
    from which the row's random key is derived, and what min_tokens counts.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    num_pending_outputs: int = 0

    @property
    def num_outputs(self) -> int:
        return len(self.output_token_ids) + self.num_pending_outputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    """Per-row sampling inputs of a batch; build with `SamplingMetadata.build`.

    `build` returns NumPy arrays; they move to the device when passed to `sample` (or earlier,
    with `jax.device_put`, to overlap the copy with the model step).

    Array fields:
      temperature [B] f32: 0 for greedy rows (including padding).
      top_k [B] i32: 0 = off.
      top_p [B], min_p [B] f32: 1 and 0 = off.
      presence_penalty, frequency_penalty, repetition_penalty [B] f32.
      seeds [B, 2] u32: low and high 32-bit words of each row's seed.
      steps [B] i32: tokens generated so far; the row's key is derived from (seed, step).
      bias_ids [B, L] i32, bias_values [B, L] f32: sparse logit bias, padded with (0, 0.0).
      banned_ids [B, M] i32: ids masked until min_tokens are generated, padded with -1.
      prompt_ids [B, H] i32: prompt ids of rows with a repetition penalty, padded with -1.
      output_ids [B, H] i32: output ids of rows with any penalty, padded with -1.
        (H is 1 when no row has a penalty.)
    Static fields (part of the jitted function's identity, so each case compiles a small graph):
      all_greedy: every row is greedy; no random path.
      any_penalties: some row has a penalty.
      any_min_p: some random row uses min-p.
      any_top_k_top_p: some random row uses top-k or top-p.
      num_logprobs: None for no logprobs, else the bucketed top-n width.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    repetition_penalty: jax.Array
    seeds: jax.Array
    steps: jax.Array
    bias_ids: jax.Array
    bias_values: jax.Array
    banned_ids: jax.Array
    prompt_ids: jax.Array
    output_ids: jax.Array
    all_greedy: bool = dataclasses.field(default=True, metadata=dict(static=True))
    any_penalties: bool = dataclasses.field(default=False, metadata=dict(static=True))
    any_min_p: bool = dataclasses.field(default=False, metadata=dict(static=True))
    any_top_k_top_p: bool = dataclasses.field(default=False, metadata=dict(static=True))
    num_logprobs: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def build(cls, rows: Sequence[SamplingRow | None], *, batch_size: int, vocab_size: int,
              eos_token_ids: Sequence[int] = (), buckets: SamplingBuckets = SamplingBuckets(),
              all_features: bool = False) -> SamplingMetadata:
        """Packs host rows into padded device arrays.

        Args:
          rows: one entry per batch row; None (or rows past the end) is a padding row.
          batch_size: B, the batch bucket (>= len(rows)).
          vocab_size: V of the logits; bias and banned ids must be below it.
          eos_token_ids: masked with stop_token_ids until a row has min_tokens outputs
            (unless the row ignores eos).
          buckets: allowed sizes of the inner dimensions.
          all_features: turn every static flag on (with the largest logprobs bucket), so one
            graph per batch and history bucket serves every batch. Rows are sampled exactly as
            with the flags they need: each feature is a no-op for rows that do not use it.
        Raises:
          ValueError: rows do not fit the batch or the buckets, an id is outside the vocab,
            or a random row has no seed (seed requests with `SamplingParams.with_seed`).
        """
        if len(rows) > batch_size:
            raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
        live = [(i, r) for i, r in enumerate(rows) if r is not None]
        for _, row in live:
            if not row.params.greedy and row.params.seed is None:
                raise ValueError("a sampled (temperature > 0) row needs a seed; give the request "
                                 "one on arrival with SamplingParams.with_seed")
        penalized = [(i, r) for i, r in live if r.params.has_penalties]
        if any(r.num_pending_outputs for _, r in penalized):
            raise ValueError("penalties need every output token on the host: sample such rows synchronously")
        repeating = [(i, r) for i, r in penalized if r.params.repetition_penalty != 1.0]
        biases = {i: r.params.logit_bias or {} for i, r in live}
        banned = {i: sorted(r.params.stop_ids(eos_token_ids)) for i, r in live
                  if r.num_outputs < r.params.min_tokens}
        random_rows = [r.params for _, r in live if not r.params.greedy]
        logprobs = [r.params.logprobs for _, r in live if r.params.logprobs is not None]

        def per_row(dtype, fill, value_of):
            out = np.full((batch_size,), fill, dtype)
            for i, row in live:
                out[i] = value_of(row.params, row)
            return out

        def padded(lists: dict[int, Sequence], width: int, fill, dtype=np.int32):
            out = np.full((batch_size, width), fill, dtype)
            for i, values in lists.items():
                out[i, :len(values)] = values
            return out

        def fit(name, lists: Sequence[Sequence]):
            return buckets.fit(name, max((len(v) for v in lists), default=0))

        for name, ids in [("logit_bias", [t for b in biases.values() for t in b]),
                          ("stop/eos", [t for b in banned.values() for t in b])]:
            if ids and max(ids) >= vocab_size:
                raise ValueError(f"{name} token id {max(ids)} is outside the vocabulary "
                                 f"(size {vocab_size})")
        prompts = {i: r.prompt_token_ids for i, r in repeating}
        outputs = {i: r.output_token_ids for i, r in penalized}
        # Prompt and output ids share one width so penalties add one shape dimension, not two.
        history = fit("history", [*prompts.values(), *outputs.values()]) if penalized else (
            buckets.history[0] if all_features else 1)
        bias_width = fit("logit_bias", list(biases.values()))
        seeds = per_row(np.uint64, 0, lambda p, r: (p.seed or 0) % 2**64)
        return cls(
            temperature=per_row(np.float32, 0.0, lambda p, r: 0.0 if p.greedy else p.temperature),
            top_k=per_row(np.int32, 0, lambda p, r: p.top_k if p.top_k < vocab_size else 0),
            top_p=per_row(np.float32, 1.0, lambda p, r: p.top_p),
            min_p=per_row(np.float32, 0.0, lambda p, r: p.min_p),
            presence_penalty=per_row(np.float32, 0.0, lambda p, r: p.presence_penalty),
            frequency_penalty=per_row(np.float32, 0.0, lambda p, r: p.frequency_penalty),
            repetition_penalty=per_row(np.float32, 1.0, lambda p, r: p.repetition_penalty),
            seeds=np.stack([seeds & 0xFFFFFFFF, seeds >> 32], axis=1).astype(np.uint32),
            steps=per_row(np.int32, 0, lambda p, r: r.num_outputs),
            bias_ids=padded({i: list(b) for i, b in biases.items()}, bias_width, 0),
            bias_values=padded({i: list(b.values()) for i, b in biases.items()}, bias_width, 0.0,
                               np.float32),
            banned_ids=padded(banned, fit("banned_ids", list(banned.values())), -1),
            prompt_ids=padded(prompts, history, -1),
            output_ids=padded(outputs, history, -1),
            all_greedy=not (random_rows or all_features),
            any_penalties=bool(penalized) or all_features,
            any_min_p=any(p.min_p > 0.0 for p in random_rows) or all_features,
            any_top_k_top_p=all_features or any(0 < p.top_k < vocab_size or p.top_p < 1.0
                                                for p in random_rows),
            num_logprobs=(buckets.logprobs[-1] if all_features else
                          buckets.fit("logprobs", max(logprobs)) if logprobs else None),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Logprobs:
    """Log-softmax of the raw logits at the chosen tokens, and the top-n alternatives.

    token_logprobs [R] f32, token_ranks [R] i32 (1 = most likely; tokens tied with the chosen
    one count as ahead of it, as in vLLM), top_ids [R, N] i32 and top_logprobs [R, N] f32
    (most likely first; equal logprobs in id order). R is B rows or T prompt positions.
    """

    token_logprobs: jax.Array
    token_ranks: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """token_ids [B] i32; logprobs of those tokens when metadata.num_logprobs is set."""

    token_ids: jax.Array
    logprobs: Logprobs | None


def apply_logit_bias(logits_bv, bias_ids_bl, bias_values_bl):
    rows = jnp.arange(logits_bv.shape[0])[:, None]
    return logits_bv.at[rows, bias_ids_bl].add(bias_values_bl)


def _scatter_mask(ids_bx, vocab_size: int):
    """[B, V] bool: which ids appear in each row of ids_bx (negative ids are padding)."""
    rows = jnp.arange(ids_bx.shape[0])[:, None]
    safe = jnp.where(ids_bx >= 0, ids_bx, vocab_size)  # out of bounds: dropped
    return jnp.zeros((ids_bx.shape[0], vocab_size), bool).at[rows, safe].set(True, mode="drop")


def apply_banned_ids(logits_bv, banned_ids_bm):
    return jnp.where(_scatter_mask(banned_ids_bm, logits_bv.shape[1]), -jnp.inf, logits_bv)


def apply_penalties(logits_bv, prompt_ids_bh, output_ids_bh, presence_b, frequency_b, repetition_b):
    """vLLM's penalties: repetition over prompt and output tokens, the others over output only."""
    b, v = logits_bv.shape
    rows = jnp.arange(b)[:, None]
    counts_bv = jnp.zeros((b, v), jnp.float32).at[
        rows, jnp.where(output_ids_bh >= 0, output_ids_bh, v)].add(1.0, mode="drop")
    in_output_bv = counts_bv > 0
    seen_bv = _scatter_mask(prompt_ids_bh, v) | in_output_bv
    penalty_bv = jnp.where(seen_bv, repetition_b[:, None], 1.0)
    # Dividing positive and multiplying negative logits makes seen tokens less likely either way.
    logits_bv = jnp.where(logits_bv > 0, logits_bv / penalty_bv, logits_bv * penalty_bv)
    return (logits_bv - frequency_b[:, None] * counts_bv
            - presence_b[:, None] * in_output_bv.astype(jnp.float32))


def filter_logits(scaled_bv, min_p_b, top_k_b, top_p_b, *, use_min_p: bool, use_top_k_top_p: bool):
    """min-p, then top-k, then top-p on the remaining mass; filtered tokens become -inf.

    Each filter keeps every token at or above a threshold logit, so tokens tied with the last
    kept one are all kept, independently of sort order.
    """
    v = scaled_bv.shape[1]
    if use_min_p:
        # p / p_max = exp(logit - max logit): no softmax needed.
        row_max = jnp.max(scaled_bv, axis=1, keepdims=True)
        scaled_bv = jnp.where(jnp.exp(scaled_bv - row_max) < min_p_b[:, None], -jnp.inf, scaled_bv)
    if not use_top_k_top_p:
        return scaled_bv
    sorted_bv = -jnp.sort(-scaled_bv, axis=1)  # descending
    k_b = jnp.where((top_k_b <= 0) | (top_k_b > v), v, top_k_b)
    top_k_threshold = jnp.take_along_axis(sorted_bv, (k_b - 1)[:, None], axis=1)
    sorted_bv = jnp.where(sorted_bv >= top_k_threshold, sorted_bv, -jnp.inf)
    probs_bv = jax.nn.softmax(sorted_bv, axis=1)
    # A token stays while the mass of strictly more likely tokens is below top_p.
    mass_before_bv = jnp.cumsum(probs_bv, axis=1) - probs_bv
    num_kept_b = jnp.sum(mass_before_bv < top_p_b[:, None], axis=1)
    top_p_threshold = jnp.take_along_axis(sorted_bv, jnp.maximum(num_kept_b, 1)[:, None] - 1, axis=1)
    # Rounding in the cumsum must not cut the tail when top-p is off.
    top_p_threshold = jnp.where(top_p_b[:, None] >= 1.0, -jnp.inf, top_p_threshold)
    threshold = jnp.maximum(top_k_threshold, top_p_threshold)
    return jnp.where(scaled_bv >= threshold, scaled_bv, -jnp.inf)


def row_keys(seeds_b2, steps_b):
    """One PRNG key per row from its (seed, step) alone, so rows never share randomness."""

    def one(seed_2, step):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed_2[0]), seed_2[1])
        return jax.random.fold_in(key, step)

    return jax.vmap(one)(seeds_b2, steps_b)


def gather_logprobs(logprobs_rv, token_ids_r, num_top: int) -> Logprobs:
    """Logprob and rank of token_ids_r in each row of logprobs_rv, and the top num_top."""
    chosen_r = jnp.take_along_axis(logprobs_rv, token_ids_r[:, None], axis=1)
    ranks_r = jnp.sum(logprobs_rv >= chosen_r, axis=1, dtype=jnp.int32)
    if num_top:
        top_logprobs, top_ids = jax.lax.top_k(logprobs_rv, num_top)
    else:
        top_logprobs = jnp.zeros((logprobs_rv.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logprobs_rv.shape[0], 0), jnp.int32)
    return Logprobs(chosen_r[:, 0], ranks_r, top_ids.astype(jnp.int32), top_logprobs)


def process_logits(logits_bv, md: SamplingMetadata):
    """Bias, min-tokens mask and penalties: the logits greedy rows take the argmax of."""
    logits_bv = apply_logit_bias(logits_bv.astype(jnp.float32), md.bias_ids, md.bias_values)
    logits_bv = apply_banned_ids(logits_bv, md.banned_ids)
    if md.any_penalties:
        logits_bv = apply_penalties(logits_bv, md.prompt_ids, md.output_ids, md.presence_penalty,
                                    md.frequency_penalty, md.repetition_penalty)
    return logits_bv


@jax.jit
def sample(logits_bv, md: SamplingMetadata) -> SamplerOutput:
    """Samples one token per row of logits_bv [B, V] under md (built for the same B and V)."""
    raw_bv = logits_bv.astype(jnp.float32)
    logits_bv = process_logits(raw_bv, md)
    token_ids = jnp.argmax(logits_bv, axis=1).astype(jnp.int32)
    if not md.all_greedy:
        greedy_b = md.temperature < GREEDY_TEMPERATURE
        scaled_bv = logits_bv / jnp.where(greedy_b, 1.0, md.temperature)[:, None]
        scaled_bv = filter_logits(scaled_bv, md.min_p, md.top_k, md.top_p,
                                  use_min_p=md.any_min_p, use_top_k_top_p=md.any_top_k_top_p)
        keys = row_keys(md.seeds, md.steps)
        gumbel_bv = jax.vmap(lambda key: jax.random.gumbel(key, scaled_bv.shape[1:]))(keys)
        drawn = jnp.argmax(scaled_bv + gumbel_bv, axis=1).astype(jnp.int32)
        token_ids = jnp.where(greedy_b, token_ids, drawn)
    logprobs = None
    if md.num_logprobs is not None:
        # Raw model logprobs (vLLM's default), before bias, penalties and temperature.
        logprobs = gather_logprobs(jax.nn.log_softmax(raw_bv, axis=1), token_ids, md.num_logprobs)
    return SamplerOutput(token_ids, logprobs)


@functools.partial(jax.jit, static_argnames=("num_logprobs",))
def prompt_logprobs(logits_tv, target_ids_t, *, num_logprobs: int) -> Logprobs:
    """Logprobs of target_ids_t [T] under logits_tv [T, V] (raw), with the top num_logprobs.

    Row t of logits_tv is the model's output at prompt position t and target t the prompt token
    at t + 1; padded positions may hold any id and are sliced off by the caller.
    """
    logprobs_tv = jax.nn.log_softmax(logits_tv.astype(jnp.float32), axis=1)
    return gather_logprobs(logprobs_tv, target_ids_t.astype(jnp.int32), num_logprobs)
