"""Speculative decoding: settings (vLLM's `speculative_config`) and the n-gram proposer.

A request that decodes may carry up to `num_speculative_tokens` proposed tokens into a step;
the step computes them with its ordinary tokens (one ragged step, see scheduler.py) and the
sampler verifies them (sampling.py): greedy rows accept a proposal equal to the argmax,
sampled rows accept proposal d with probability p(d) and otherwise draw from p without d,
which leaves every token distributed exactly as p. Proposals here are deterministic (one
token per position), which is what makes that residual so simple.

Host Python only: this module must not import jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

METHODS = ("ngram", "draft_model", "eagle", "eagle3")
# Proposers that exist; the others are refused with a clear message.
SUPPORTED_METHODS = ("ngram", "draft_model", "eagle")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config` fields.

    Attributes:
      method: "ngram" (prompt lookup: the tokens that followed the latest earlier occurrence
        of the sequence's last n tokens), "draft_model" (a smaller model sharing the tokenizer)
        or "eagle" (a one-layer head reading the target's features: engine/eagle_proposer.py).
      num_speculative_tokens: most tokens proposed per request per step (k).
      prompt_lookup_min, prompt_lookup_max: n-gram sizes tried, longest first (vLLM's
        defaults: 5 and 5, either one defaulting to the other).
      model: the draft model of method "draft_model": a path or alias as `LLM(model=...)` takes,
        or a LoadedModel; it must share the target's tokenizer (its vocabulary size is checked).
        It proposes greedily (engine/draft_model.py). For "eagle": the directory of an EAGLE
        head in the published layout (loading/eagle.py), trained for the target.
      disable_by_batch_size: no proposals while more requests than this run (proposals
        verified at large batch cost compute that no longer hides under the weight read);
        None: always propose.
      adaptive: propose only while it measures faster (SpeculationGovernor: output tokens per
        second with and without proposals, per batch-size bucket, re-probed now and then).
        This engine's extension (vLLM has no such key); False proposes whenever it can.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: Any = dataclasses.field(default=None, compare=False)
    disable_by_batch_size: int | None = None
    adaptive: bool = True

    def __post_init__(self):
        method = self.method
        if method is None and self.model is not None:
            method = "draft_model"
        if method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {METHODS}, got {method!r}")
        if method not in SUPPORTED_METHODS:
            raise ValueError(f"speculative_config method {method!r} is not supported yet; use one of "
                             f"{SUPPORTED_METHODS}")
        object.__setattr__(self, "method", method)
        if method == "draft_model" and self.model is None:
            raise ValueError("speculative_config method 'draft_model' needs a draft `model`")
        if method == "eagle" and self.model is None:
            raise ValueError("speculative_config method 'eagle' needs the head's directory as `model`")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            lo = hi = 5
        lo = hi if lo is None else lo
        hi = lo if hi is None else hi
        for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if lo > hi:
            raise ValueError(f"prompt_lookup_min ({lo}) exceeds prompt_lookup_max ({hi})")
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)
        limit = self.disable_by_batch_size
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"disable_by_batch_size must be a positive integer or None, got {limit!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be true or false, got {self.adaptive!r}")

    @classmethod
    def from_dict(cls, value: "SpeculativeConfig | Mapping[str, Any] | None") -> "SpeculativeConfig | None":
        """From vLLM's dict form (as `--speculative-config '{...}'` gives it); unknown keys are an error."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"speculative_config must be a dict, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        fields = dict(value)
        if "method" not in fields and fields.get("model") is not None:
            fields["method"] = "draft_model"
        return cls(**fields)


def ngram_proposal(token_ids: Sequence[int] | np.ndarray, *, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n
    tokens, for the largest n in [min_n, max_n] that has one; [] when none does.

    Every occurrence ends at a position holding the last token, so only those positions are
    extended backwards (at most max_n compares each), not every window of the sequence."""
    tokens = np.asarray(token_ids)
    last = tokens.shape[0] - 1
    ends = np.flatnonzero(tokens[:last] == tokens[last]) if last > 0 else np.zeros(0, np.int64)
    # lengths[e]: how far the match ending at ends[e] reaches back (capped at max_n).
    lengths = np.ones(ends.shape[0], np.int64)
    alive = np.ones(ends.shape[0], bool)
    for j in range(1, min(max_n, last)):  # a match ending before `last` spans at most `last` tokens
        alive &= ends >= j
        alive[alive] = tokens[ends[alive] - j] == tokens[last - j]
        lengths += alive
    for n in range(max_n, min_n - 1, -1):
        hits = ends[lengths >= n]
        if hits.size:
            start = int(hits[-1]) + 1
            return tokens[start:start + k].tolist()
    return []


class TokenHistories:
    """Each request's tokens as one growing NumPy array, extended by the tokens appended since
    the last call, so proposing does not convert a whole history every step."""

    def __init__(self):
        self._arrays: dict[str, tuple[np.ndarray, int]] = {}

    def view(self, request_id: str, token_ids: Sequence[int]) -> np.ndarray:
        """The request's tokens (a view; valid until the next call for it)."""
        buf, n = self._arrays.get(request_id, (np.zeros(0, np.int64), 0))
        total = len(token_ids)
        if total > buf.shape[0]:
            grown = np.zeros(max(2 * buf.shape[0], total, 64), np.int64)
            grown[:n] = buf[:n]
            buf = grown
        buf[n:total] = token_ids[n:total]
        self._arrays[request_id] = (buf, total)
        return buf[:total]

    def keep_only(self, request_ids) -> None:
        self._arrays = {rid: v for rid, v in self._arrays.items() if rid in request_ids}

    def __len__(self) -> int:
        return len(self._arrays)


class SpeculationGovernor:
    """Decides, step by step, whether proposing pays: output tokens per second measured with
    proposals (synchronous steps that verify them) against without (asynchronous plain steps),
    per batch-size bucket (powers of 2 of the running requests), since what pays at batch 1
    can lose at batch 64 (verification's extra rows and the lost host overlap then cost more
    than the accepted tokens bring: measured 0.66-0.77x on chat at batch 64 without a throttle).

    Each mode's rate is an exponential average over its steps; the first step after a switch is
    not counted (it carries the switch's own cost). A bucket tries proposals first, then plain
    steps for `probe_steps`, then keeps the faster mode and probes the other again every
    `reprobe_every` steps, so a change of workload is noticed.

    Host Python only; the engine calls `speculate(num_running)` before a step and
    `record(num_running, speculated, seconds, tokens)` after each step.
    """

    def __init__(self, probe_steps: int = 4, reprobe_every: int = 64, smoothing: float = 0.25):
        if probe_steps < 2 or reprobe_every <= probe_steps or not 0.0 < smoothing <= 1.0:
            raise ValueError("probe_steps >= 2, reprobe_every > probe_steps and smoothing in (0, 1] are needed")
        self.probe_steps, self.reprobe_every, self.smoothing = probe_steps, reprobe_every, smoothing
        self._buckets: dict[int, dict] = {}

    @staticmethod
    def bucket(num_running: int) -> int:
        return 1 << max(0, num_running - 1).bit_length()

    def _state(self, num_running: int) -> "_BucketState":
        return self._buckets.setdefault(self.bucket(num_running), _BucketState())

    def rates(self, num_running: int) -> dict[bool, float | None]:
        """Tokens per second with (True) and without (False) proposals in this bucket."""
        return dict(self._state(num_running).rate)

    def speculate(self, num_running: int) -> bool:
        """Whether the next step should carry proposals."""
        s = self._state(num_running)
        mode = s.mode
        if s.counted[mode] < self.probe_steps:
            return mode  # still measuring this mode
        if s.counted[not mode] < self.probe_steps:
            s.switch_to(not mode)  # measure the other mode next
            return s.mode
        best = s.rate[True] >= s.rate[False]
        if mode == best and s.steps_in_mode >= self.reprobe_every:
            s.switch_to(not best)  # look at the other mode again, measured afresh
            s.counted[not best] = 0
        elif mode != best:
            s.switch_to(best)
        return s.mode

    def record(self, num_running: int, speculated: bool, seconds: float, tokens: int) -> None:
        """One step's wall time and output tokens, in the mode it ran in."""
        s = self._state(num_running)
        switched = s.last_mode is not None and s.last_mode != speculated
        s.last_mode = speculated
        s.steps_in_mode += 1
        if switched or seconds <= 0:
            return
        rate, old = tokens / seconds, s.rate[speculated]
        s.rate[speculated] = rate if s.counted[speculated] == 0 else old + self.smoothing * (rate - old)
        s.counted[speculated] += 1


@dataclasses.dataclass
class _BucketState:
    """One batch-size bucket of SpeculationGovernor: each mode's rate and how many steps it
    was measured over, the mode in use and for how long, the mode of the last recorded step."""

    rate: dict = dataclasses.field(default_factory=lambda: {True: None, False: None})
    counted: dict = dataclasses.field(default_factory=lambda: {True: 0, False: 0})
    mode: bool = True
    steps_in_mode: int = 0
    last_mode: bool | None = None

    def switch_to(self, mode: bool) -> None:
        self.mode, self.steps_in_mode = mode, 0
