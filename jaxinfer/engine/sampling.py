"""The batched sampler: one jitted function from a step's logits to its next tokens.

The host packs each request's sampling state into `SamplingMetadata`, arrays of fixed shapes;
`sample` runs entirely on the device and returns only token ids (and logprobs in the full
variant). Processing follows vLLM: logit bias, min-tokens mask, penalties, temperature, min-p,
top-k, top-p, then a Gumbel-max draw. Greedy rows take the argmax of the processed logits.

Four graphs per batch size serve every combination of parameters (`sampler_variant`), so the
engine compiles them all at start-up. Penalties read each request's history from a
`PenaltyState` kept on the device, not from lists sent every step.

Every row draws from its own key, derived from (seed, tokens generated so far), so a seeded
request gets the same tokens whatever else shares its batch and wherever its row sits.

Speculative decoding (`speculative` programs): a row may carry a proposed token, which the
sampler verifies against the row's own distribution p (after every processing step): a greedy
row accepts it when it is the argmax; a sampled row accepts it with probability p(proposal)
and otherwise draws from p with the proposal removed, so the row's token is distributed as
p either way (rejection sampling with a deterministic proposer). A request's k proposals are
k + 1 consecutive rows (the last known token's, then each proposal's), each with its own
step, so min_tokens and the random keys see the position the row samples for.

Glossary for shapes: B rows (a batch size; rows past the real ones are padding), V vocab,
L logit-bias entries, M banned ids, R penalty slots, T prompt positions, N top logprobs,
W packed 32-token words of a grammar bitmask (ceil(V / 32)).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.engine.packing import PackSpec, unpack
from jaxinfer.sampling_params import GREEDY_TEMPERATURE, MAX_LOGPROBS, NUM_SAMPLER_FLOATS, SamplingParams


# Rows without penalties point here: gathers from the penalty state fill, scatters drop.
NO_SLOT = np.iinfo(np.int32).max
# Ids written into the penalty state per call; a longer history takes several calls.
HISTORY_CHUNK = 2048
VARIANTS = ("greedy", "random", "filtered", "full")


@dataclasses.dataclass(frozen=True)
class SamplingWidths:
    """Fixed inner widths of the full sampler's per-row lists, so it compiles once per batch size.

    logit_bias: most logit-bias entries a request may carry.
    banned_ids: most ids (stop ids and eos) masked until min_tokens are generated.
    """

    logit_bias: int = 1024
    banned_ids: int = 64

    def __post_init__(self):
        for name in ("logit_bias", "banned_ids"):
            if getattr(self, name) < 1:
                raise ValueError(f"SamplingWidths.{name} must be positive, got {getattr(self, name)}")


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
    draft_token_id: int = -1  # a proposed token this row verifies (speculative decoding)

    @property
    def num_outputs(self) -> int:
        return len(self.output_token_ids) + self.num_pending_outputs


def sampler_variant(rows: Sequence[SamplingRow | None], eos_token_ids: Sequence[int] = ()) -> str:
    """The cheapest compiled sampler that serves every row.

    "greedy": argmax only. "random": temperature and a Gumbel draw. "filtered": plus min-p,
    top-k and top-p. "full": everything, with logit bias, the min-tokens mask, penalties and
    logprobs at fixed widths. Each feature is a no-op for rows that do not use it, so four
    graphs per batch size serve every combination of parameters.
    """
    rank = max((r.params.sampler_row.variant_rank for r in rows if r is not None), default=0)
    if rank < 3 and any(r is not None and r.params.min_tokens and r.num_outputs < r.params.min_tokens
                        and r.params.stop_ids(eos_token_ids) for r in rows):
        rank = 3
    return VARIANTS[rank]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    """Per-row sampling inputs of a batch; build with `SamplingMetadata.build`.

    `build` returns NumPy arrays; they move to the device when passed to `sample`.

    Array fields:
      temperature [B] f32: 0 for greedy rows (including padding).
      top_k [B] i32: 0 = off.
      top_p [B], min_p [B] f32: 1 and 0 = off.
      presence_penalty, frequency_penalty, repetition_penalty [B] f32.
      seeds [B, 2] u32: low and high 32-bit words of each row's seed.
      steps [B] i32: tokens generated so far; the row's key is derived from (seed, step).
      bias_ids [B, L] i32, bias_values [B, L] f32: sparse logit bias, padded with (0, 0.0).
      banned_ids [B, M] i32: ids masked until min_tokens are generated, padded with -1.
      penalty_slots [B] i32: each row's slot in the `PenaltyState` (NO_SLOT: no penalties).
      draft_ids [B] i32: the proposed token each row verifies, -1 for none.
      (L and M are 0 except in the full variant.)
    Static fields: variant, one of VARIANTS (see `sampler_variant`); speculative: the
    program verifies draft_ids (others ignore them).
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
    penalty_slots: jax.Array
    draft_ids: jax.Array
    variant: str = dataclasses.field(default="greedy", metadata=dict(static=True))
    speculative: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def num_logprobs(self) -> int | None:
        return MAX_LOGPROBS if self.variant == "full" else None

    @classmethod
    def build(cls, rows: Sequence[SamplingRow | None], *, batch_size: int, vocab_size: int,
              eos_token_ids: Sequence[int] = (), widths: SamplingWidths = SamplingWidths(),
              penalty_slots: Sequence[int] | None = None, variant: str | None = None,
              speculative: bool | None = None) -> SamplingMetadata:
        """Packs host rows into padded arrays.

        Args:
          rows: one entry per batch row; None (or rows past the end) is a padding row.
          batch_size: B (>= len(rows)).
          vocab_size: V of the logits; bias and banned ids must be below it.
          eos_token_ids: masked with stop_token_ids until a row has min_tokens outputs
            (unless the row ignores eos).
          widths: the full variant's fixed list widths.
          penalty_slots: per row, its slot in the PenaltyState (rows with penalties need one).
          variant: the compiled sampler to use (None: `sampler_variant(rows)`); a richer one
            than needed gives the same tokens.
          speculative: verify the rows' draft tokens (None: when any row has one).
        Raises:
          ValueError: rows do not fit the batch or the widths, an id is outside the vocab,
            a random row has no seed (seed requests with `SamplingParams.with_seed`), or a row
            with penalties has no slot.
        """
        if len(rows) > batch_size:
            raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
        needed = sampler_variant(rows, eos_token_ids)
        variant = variant or needed
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if VARIANTS.index(variant) < VARIANTS.index(needed):
            raise ValueError(f"these rows need the {needed!r} sampler, not {variant!r}")
        live = [(i, r) for i, r in enumerate(rows) if r is not None]
        drafts = np.full((batch_size,), -1, np.int32)
        for i, row in live:
            if row.draft_token_id >= 0:
                if row.draft_token_id >= vocab_size or row.params.has_penalties:
                    raise ValueError(f"row {i}: a draft token must be inside the vocabulary, on a row "
                                     "without penalties")
                drafts[i] = row.draft_token_id
        if speculative is None:
            speculative = bool((drafts >= 0).any())
        elif not speculative and (drafts >= 0).any():
            raise ValueError("rows carry draft tokens, but the sampler is not speculative")
        for _, row in live:
            if not row.params.greedy and row.params.seed is None:
                raise ValueError("a sampled (temperature > 0) row needs a seed; give the request "
                                 "one on arrival with SamplingParams.with_seed")
        full = variant == "full"
        # Only the full variant has rows with a bias or a min-tokens mask (sampler_variant).
        biases = {i: r.params.logit_bias for i, r in live if full and r.params.logit_bias}
        banned = {i: sorted(r.params.stop_ids(eos_token_ids)) for i, r in live
                  if full and r.num_outputs < r.params.min_tokens}
        for name, lists, width in [("logit_bias", biases, widths.logit_bias),
                                   ("min_tokens stop/eos", banned, widths.banned_ids)]:
            ids = [t for values in lists.values() for t in values]
            if ids and max(ids) >= vocab_size:
                raise ValueError(f"{name} token id {max(ids)} is outside the vocabulary (size {vocab_size})")
            if max(map(len, lists.values()), default=0) > width:
                raise ValueError(f"{max(map(len, lists.values()))} {name} entries exceed the sampler's "
                                 f"width ({width})")
        slots = np.full((batch_size,), NO_SLOT, np.int32)
        for i, r in live if full else ():  # only the full variant has rows with penalties
            if r.params.has_penalties:
                if penalty_slots is None or penalty_slots[i] == NO_SLOT:
                    raise ValueError(f"row {i} has penalties but no slot in the penalty state")
                slots[i] = penalty_slots[i]

        def padded(lists: dict[int, Sequence], width: int, fill, dtype=np.int32):
            out = np.full((batch_size, width), fill, dtype)
            for i, values in lists.items():
                out[i, :len(values)] = values
            return out

        # One tuple per row, then column arrays: padding rows stay greedy and neutral.
        floats = np.zeros((batch_size, 7), np.float32)
        floats[:, 1] = 1.0  # top_p
        floats[:, 6] = 1.0  # repetition_penalty
        ints = np.zeros((batch_size, 2), np.int64)  # top_k, steps
        seeds = np.zeros(batch_size, np.uint64)
        if live:
            index = np.fromiter((i for i, _ in live), np.int64, len(live))
            sampler_rows = [r.params.sampler_row for _, r in live]
            # The float fields and top_k, one row each (top_k is exact in float64).
            values = np.array([row[:NUM_SAMPLER_FLOATS + 1] for row in sampler_rows], np.float64)
            floats[index, :5] = values[:, :5]
            floats[index, 6] = values[:, 5]  # repetition_penalty
            top_k = values[:, NUM_SAMPLER_FLOATS].astype(np.int64)
            ints[index, 0] = np.where(top_k < vocab_size, top_k, 0)
            ints[index, 1] = np.fromiter((r.num_outputs for _, r in live), np.int64, len(live))
            seeds[index] = [row.seed % 2**64 for row in sampler_rows]  # int64 seeds, exact as Python ints
        return cls(
            temperature=floats[:, 0].copy(),
            top_k=ints[:, 0].astype(np.int32),
            top_p=floats[:, 1].copy(),
            min_p=floats[:, 2].copy(),
            presence_penalty=floats[:, 3].copy(),
            frequency_penalty=floats[:, 4].copy(),
            repetition_penalty=floats[:, 6].copy(),
            seeds=np.stack([seeds & 0xFFFFFFFF, seeds >> 32], axis=1).astype(np.uint32),
            steps=ints[:, 1].astype(np.int32),
            bias_ids=padded({i: list(b) for i, b in biases.items()}, widths.logit_bias if full else 0, 0),
            bias_values=padded({i: list(b.values()) for i, b in biases.items()},
                               widths.logit_bias if full else 0, 0.0, np.float32),
            banned_ids=padded(banned, widths.banned_ids if full else 0, -1),
            penalty_slots=slots,
            draft_ids=drafts,
            variant=variant,
            speculative=speculative,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyState:
    """What penalties need of each request's history, kept on the device between steps.

    prompt_mask [R, V] bool: the ids in slot r's prompt. output_counts [R, V] i32: how often
    each id was generated. A request gets a slot when it first samples with penalties
    (`PenaltySlots`), its history is written once, and every full-variant step adds the
    tokens it samples, so no step sends a history and the host never needs the last token:
    penalties work under asynchronous scheduling.
    """

    prompt_mask: jax.Array
    output_counts: jax.Array

    @classmethod
    def allocate(cls, num_slots: int, vocab_size: int, placement=None) -> PenaltyState:
        state = cls(np.zeros((num_slots, vocab_size), bool), np.zeros((num_slots, vocab_size), np.int32))
        return jax.device_put(state, placement)


@functools.partial(jax.jit, donate_argnums=(0,))
def write_history(state: PenaltyState, slot, reset, prompt_ids_e, output_ids_e) -> PenaltyState:
    """Adds prompt ids and output ids (each [HISTORY_CHUNK], padded with -1) to `slot`, after
    clearing it when `reset`."""
    v = state.prompt_mask.shape[1]
    mask, counts = state.prompt_mask, state.output_counts
    keep = jnp.logical_not(reset)
    mask = mask.at[slot].set(mask[slot] & keep)
    counts = counts.at[slot].set(counts[slot] * keep.astype(counts.dtype))
    mask = mask.at[slot, jnp.where(prompt_ids_e >= 0, prompt_ids_e, v)].set(True, mode="drop")
    counts = counts.at[slot, jnp.where(output_ids_e >= 0, output_ids_e, v)].add(1, mode="drop")
    return PenaltyState(mask, counts)


class PenaltySlots:
    """Assigns requests with penalties their rows in a `PenaltyState` and writes their histories.

    A request keeps its slot until released (finished); when every slot is taken, the slot of
    a request not in the current batch (preempted) is reused, and that request's history is
    written again from the host's tokens when it next samples.
    """

    def __init__(self, num_slots: int, vocab_size: int, placement=None):
        self.num_slots = num_slots
        self.state = PenaltyState.allocate(num_slots, vocab_size, placement)
        self._placement = placement
        self._slots: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self.num_evictions = 0  # slots taken from requests not in the batch

    def __len__(self) -> int:
        return len(self._slots)

    def warmup(self):
        self.write(0, [], [], reset=False)

    def slots_for(self, request_ids: Sequence[str], rows: Sequence[SamplingRow | None]) -> list[int]:
        """Each row's slot (NO_SLOT for padding and rows without penalties), writing new
        holders' histories."""
        out = []
        current = set(request_ids)
        for rid, row in zip(request_ids, rows):
            if row is None or not row.params.has_penalties:
                out.append(NO_SLOT)
                continue
            slot = self._slots.get(rid)
            if slot is None:
                if row.num_pending_outputs:
                    raise RuntimeError(f"request {rid!r} needs its history written with tokens still in flight")
                slot = self._take_slot(current)
                self._slots[rid] = slot
                self.write(slot, row.prompt_token_ids, row.output_token_ids, reset=True)
            out.append(slot)
        return out

    def release(self, request_ids) -> None:
        for rid in request_ids:
            slot = self._slots.pop(rid, None)
            if slot is not None:
                self._free.append(slot)

    def _take_slot(self, keep: set[str]) -> int:
        if self._free:
            return self._free.pop()
        for rid, slot in self._slots.items():
            if rid not in keep:
                del self._slots[rid]
                self.num_evictions += 1
                return slot
        raise RuntimeError(f"more than {self.num_slots} requests with penalties in one step")

    def write(self, slot: int, prompt_ids: Sequence[int], output_ids: Sequence[int], *, reset: bool):
        """Adds the ids to `slot` (cleared first when `reset`), HISTORY_CHUNK of each per call."""
        for start in range(0, max(len(prompt_ids), len(output_ids), 1), HISTORY_CHUNK):
            chunk = []
            for ids in (prompt_ids, output_ids):
                part = np.full(HISTORY_CHUNK, -1, np.int32)
                piece = ids[start:start + HISTORY_CHUNK]
                part[:len(piece)] = piece
                chunk.append(jax.device_put(part, self._placement))
            self.state = write_history(self.state, jnp.int32(slot), jnp.bool_(reset and start == 0), *chunk)


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
    """token_ids [B] i32; logprobs of those tokens when metadata.num_logprobs is set;
    accepted [B] bool from speculative programs: the row's draft token was accepted (its token
    is the draft), else None."""

    token_ids: jax.Array
    logprobs: Logprobs | None
    accepted: jax.Array | None = None


def unpack_token_bitmask(bitmask_bw, vocab_size: int):
    """[B, V] bool from packed int32 words [B, W]: bit j of word w allows token 32 w + j."""
    bits_bw32 = (bitmask_bw[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits_bw32.reshape(bitmask_bw.shape[0], -1)[:, :vocab_size].astype(bool)


@jax.jit
def apply_token_bitmask(logits_bv, bitmask_bw):
    """Grammar masking (structured outputs): disallowed tokens' logits become -inf, before any
    other processing, so penalties, temperature, top-k/top-p and logprobs all see the masked
    distribution (as in vLLM). Part of every sampler program (`sample_packed`): an all-ones
    row costs a fused select, where a separate program would cost a launch per step."""
    allowed_bv = unpack_token_bitmask(bitmask_bw, logits_bv.shape[1])
    return jnp.where(allowed_bv, logits_bv, -jnp.inf).astype(logits_bv.dtype)


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


def apply_penalties(logits_bv, prompt_mask_bv, counts_bv, presence_b, frequency_b, repetition_b):
    """vLLM's penalties: repetition over prompt and output tokens, the others over output only."""
    counts_bv = counts_bv.astype(jnp.float32)
    in_output_bv = counts_bv > 0
    seen_bv = prompt_mask_bv | in_output_bv
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


def process_logits(logits_bv, md: SamplingMetadata, penalties: PenaltyState | None = None):
    """Bias, min-tokens mask and penalties: the logits greedy rows take the argmax of."""
    logits_bv = logits_bv.astype(jnp.float32)
    if md.variant != "full":
        return logits_bv
    logits_bv = apply_logit_bias(logits_bv, md.bias_ids, md.bias_values)
    logits_bv = apply_banned_ids(logits_bv, md.banned_ids)
    # Rows without a slot (NO_SLOT) read an empty history.
    mask_bv = jnp.take(penalties.prompt_mask, md.penalty_slots, axis=0, mode="fill", fill_value=False)
    counts_bv = jnp.take(penalties.output_counts, md.penalty_slots, axis=0, mode="fill", fill_value=0)
    return apply_penalties(logits_bv, mask_bv, counts_bv, md.presence_penalty, md.frequency_penalty,
                           md.repetition_penalty)


def _sample(logits_bv, md: SamplingMetadata, penalties: PenaltyState | None = None
            ) -> tuple[SamplerOutput, PenaltyState | None]:
    """Samples one token per row of logits_bv [B, V] under md (built for the same B and V).

    The full variant needs the penalty state; it returns it with the sampled tokens counted
    in each row's slot (the others return it unchanged, or None).
    """
    if md.variant == "full" and penalties is None:
        raise ValueError("the full sampler needs the penalty state")
    raw_bv = logits_bv.astype(jnp.float32)
    logits_bv = process_logits(raw_bv, md, penalties)
    token_ids = jnp.argmax(logits_bv, axis=1).astype(jnp.int32)
    has_draft_b = md.draft_ids >= 0
    draft_b = jnp.maximum(md.draft_ids, 0)
    if md.variant != "greedy":
        greedy_b = md.temperature < GREEDY_TEMPERATURE
        scaled_bv = logits_bv / jnp.where(greedy_b, 1.0, md.temperature)[:, None]
        filters = md.variant in ("filtered", "full")
        scaled_bv = filter_logits(scaled_bv, md.min_p, md.top_k, md.top_p, use_min_p=filters,
                                  use_top_k_top_p=filters)
        keys = row_keys(md.seeds, md.steps)
        accept_b = None
        if md.speculative:
            # Accept the draft with probability p(draft); otherwise draw from p without it.
            p_draft_b = jnp.take_along_axis(jax.nn.softmax(scaled_bv, axis=1), draft_b[:, None], axis=1)[:, 0]
            u_b = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1)))(keys)
            accept_b = has_draft_b & (u_b < p_draft_b)
            is_draft_bv = has_draft_b[:, None] & (jnp.arange(scaled_bv.shape[1])[None, :] == draft_b[:, None])
            scaled_bv = jnp.where(is_draft_bv, -jnp.inf, scaled_bv)
        gumbel_bv = jax.vmap(lambda key: jax.random.gumbel(key, scaled_bv.shape[1:]))(keys)
        drawn = jnp.argmax(scaled_bv + gumbel_bv, axis=1).astype(jnp.int32)
        if accept_b is not None:
            drawn = jnp.where(accept_b, draft_b, drawn)
        token_ids = jnp.where(greedy_b, token_ids, drawn)
    # A rejected draft is never drawn (it was removed), so acceptance is equality.
    accepted = has_draft_b & (token_ids == draft_b) if md.speculative else None
    logprobs = None
    if md.variant == "full":
        # Raw model logprobs (vLLM's default), before bias, penalties and temperature.
        logprobs = gather_logprobs(jax.nn.log_softmax(raw_bv, axis=1), token_ids, MAX_LOGPROBS)
        penalties = PenaltyState(penalties.prompt_mask, penalties.output_counts.at[md.penalty_slots, token_ids].add(
            1, mode="drop"))
    return SamplerOutput(token_ids, logprobs, accepted), penalties


sample = jax.jit(_sample, donate_argnums=(2,))


@functools.partial(jax.jit, static_argnames=("spec", "pad_to"), donate_argnums=(2,))
def sample_packed(logits_bv, packed_md, penalties: PenaltyState | None, bitmask_bw, *, spec: PackSpec,
                  pad_to: int):
    """A step's whole sampling in one program (each program call costs the host a launch):
    `sample` with the metadata packed into one array (`packing.pack`: one transfer a step),
    after the grammar bitmask (all ones in rows without a grammar: the runner keeps such a
    mask on the device); also returns the tokens padded to pad_to rows, which the next step
    reads on the device under asynchronous scheduling."""
    out, penalties = _sample(apply_token_bitmask(logits_bv, bitmask_bw), unpack(packed_md, spec), penalties)
    return out, penalties, jnp.pad(out.token_ids, (0, pad_to - out.token_ids.shape[0]))


@functools.partial(jax.jit, static_argnames=("num_logprobs",))
def prompt_logprobs(logits_tv, target_ids_t, *, num_logprobs: int = MAX_LOGPROBS) -> Logprobs:
    """Logprobs of target_ids_t [T] under logits_tv [T, V] (raw), with the top num_logprobs.

    Row t of logits_tv is the model's output at prompt position t and target t the prompt token
    at t + 1; padded positions may hold any id and are sliced off by the caller.
    """
    logprobs_tv = jax.nn.log_softmax(logits_tv.astype(jnp.float32), axis=1)
    return gather_logprobs(logprobs_tv, target_ids_t.astype(jnp.int32), num_logprobs)
