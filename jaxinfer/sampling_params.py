"""Per-request sampling parameters, with vLLM's field names and ranges.

`SamplingParams` is what users and the server hand to the engine; the engine turns a batch of
them into device arrays (`jaxinfer.engine.sampling.SamplingMetadata`) and feeds stop strings to
the detokenizer. Every field is checked when the object is built, so a bad request fails at
admission with a message naming the field, never inside a jitted step.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import numbers
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's documented range for logit_bias values
# The constraint fields of StructuredOutputsParams, exactly one of which is set.
CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class RequestOutputKind(enum.Enum):
    """What each streamed output of a request carries."""

    CUMULATIVE = 0  # the whole text and token ids so far
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # nothing until the request finishes


def _is_int(value) -> bool:
    # bool is an int subclass, but True as a token count is always a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value, lo: int | None = None, hi: int | None = None, *, optional=False):
    if value is None and optional:
        return None
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in {_range_text(lo, hi)}, got {value}")
    return int(value)


def _check_real(name: str, value, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    if not _is_real(value):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if math.isnan(value) or too_low or too_high:
        lo_text = f"{'(' if lo_open else '['}{lo:g}"
        hi_text = f"{hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {lo_text}, {hi_text}, got {value}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def _range_text(lo, hi) -> str:
    return f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def _check_token_ids(name: str, ids) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"{name} must be a list of token ids, got {ids!r}")
    return tuple(_check_int(f"{name}[{i}]", t, 0) for i, t in enumerate(ids))


def _check_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Iterable) or isinstance(stop, bytes):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    stop = tuple(stop)
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise ValueError(f"stop[{i}] must be a string, got {s!r} ({type(s).__name__})")
        if not s:
            raise ValueError(f"stop[{i}] must be a non-empty string")
    return stop


def _check_logit_bias(bias) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {bias!r}")
    out = {}
    for token, value in bias.items():
        token = _check_int("logit_bias token id", token, 0)
        out[token] = _check_real(f"logit_bias[{token}]", value, -MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS)
    return dict(sorted(out.items())) or None


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on what a request may generate (vLLM's `StructuredOutputsParams`).

    Exactly one of the constraint fields is set:
      json: a JSON schema (dict, or its JSON text); the output is an instance of it.
      regex: the output matches this regular expression in full.
      choice: the output is exactly one of these strings.
      grammar: a context-free grammar (Lark / GBNF text, as the grammar library takes it).
      json_object: True for any JSON object (OpenAI's `response_format: json_object`).
      structural_tag: free text in which each trigger opens a tagged region whose body follows a
        JSON schema (vLLM's field: JSON text of {"structures": [{"begin", "schema", "end"}],
        "triggers": [...]}, as `response_format: structural_tag` gives it); tool calls in a
        model's own format, for instance.
    disable_any_whitespace: JSON is emitted without free whitespace between tokens.
    """

    json: str | Mapping[str, Any] | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    structural_tag: str | None = None

    def __post_init__(self):
        set_fields = [name for name in CONSTRAINT_KINDS if getattr(self, name) not in (None, False)]
        if len(set_fields) != 1:
            raise ValueError("structured_outputs: exactly one of json, regex, choice, grammar, json_object or "
                             f"structural_tag must be set, got {set_fields or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, Mapping)):
            raise ValueError(f"structured_outputs.json must be a schema (dict or JSON text), "
                             f"got {type(self.json).__name__}")
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            if (isinstance(self.choice, (str, bytes)) or not isinstance(self.choice, Iterable)
                    or not self.choice or not all(isinstance(c, str) for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object is not None:
            _check_bool("structured_outputs.json_object", self.json_object)
        _check_bool("structured_outputs.disable_any_whitespace", self.disable_any_whitespace)

    def __hash__(self):
        import json as _json
        schema = self.json if isinstance(self.json, (str, type(None))) else _json.dumps(
            self.json, sort_keys=True)
        return hash((schema, self.regex, self.choice, self.grammar, self.json_object,
                     self.disable_any_whitespace, self.structural_tag))

    @property
    def kind(self) -> str:
        """Which constraint this is: one of CONSTRAINT_KINDS."""
        for name in CONSTRAINT_KINDS:
            if getattr(self, name) not in (None, False):
                return name
        raise AssertionError("unreachable: validated in __post_init__")


class SamplerRow(NamedTuple):
    """`SamplingParams.sampler_row`: the floats first (the sampler's float columns, in order),
    then top_k, the seed (0 when None) and the rank of the cheapest sampler variant that serves
    them before min_tokens (0 greedy, 1 random, 2 filtered, 3 full)."""

    temperature: float  # 0 when greedy
    top_p: float
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    top_k: int
    seed: int
    variant_rank: int


NUM_SAMPLER_FLOATS = 6  # SamplerRow's leading float fields


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (vLLM-compatible names and ranges).

    Attributes:
      n: number of completions for the prompt.
      temperature: 0 (or below 1e-5) is greedy.
      top_p: nucleus mass in (0, 1]; 1 is off.
      top_k: keep the k most likely tokens; 0 or -1 is off (stored as 0).
      min_p: drop tokens less likely than min_p times the most likely one; 0 is off.
      presence_penalty, frequency_penalty: in [-2, 2], over generated tokens only.
      repetition_penalty: > 0, over prompt and generated tokens; 1 is off.
      seed: makes sampling reproducible (int64 range); None draws a fresh one per request.
      stop: strings that end the output (normalised to a tuple).
      stop_token_ids: token ids that end the output (normalised to a tuple).
      include_stop_str_in_output: keep the matched stop string in the text.
      ignore_eos: keep generating after the end-of-sequence token.
      max_tokens: most tokens to generate (None: up to the model's context length).
      min_tokens: stop strings, stop ids and eos are suppressed before this many tokens.
      logprobs: top-n logprobs to return per generated token (0..20; 0 = the sampled one only).
      prompt_logprobs: the same for prompt tokens.
      logit_bias: token id -> additive bias in [-100, 100].
      skip_special_tokens: leave special tokens out of the text.
      spaces_between_special_tokens: separate special tokens from text with spaces
        (when they are not skipped).
      output_kind: what streamed outputs carry.
      structured_outputs: a grammar constraint on the output (`StructuredOutputsParams`).
      speculative: False keeps this request out of speculative decoding (its tokens are
        never proposed and verified, one per step), when the engine has it on.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: Mapping[int, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    speculative: bool = True

    def __post_init__(self):
        top_k = _check_int("top_k", self.top_k, -1)
        max_tokens = _check_int("max_tokens", self.max_tokens, 1, optional=True)
        min_tokens = _check_int("min_tokens", self.min_tokens, 0)
        if max_tokens is not None and min_tokens > max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({max_tokens}), got {min_tokens}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        if not isinstance(self.structured_outputs, (StructuredOutputsParams, type(None))):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")
        normalised = dict(
            n=_check_int("n", self.n, 1),
            temperature=_check_real("temperature", self.temperature, 0.0, math.inf, hi_open=True),
            top_p=_check_real("top_p", self.top_p, 0.0, 1.0, lo_open=True),
            top_k=max(top_k, 0),
            min_p=_check_real("min_p", self.min_p, 0.0, 1.0),
            presence_penalty=_check_real("presence_penalty", self.presence_penalty, -2.0, 2.0),
            frequency_penalty=_check_real("frequency_penalty", self.frequency_penalty, -2.0, 2.0),
            repetition_penalty=_check_real("repetition_penalty", self.repetition_penalty, 0.0,
                                           math.inf, lo_open=True, hi_open=True),
            seed=_check_int("seed", self.seed, _INT64_MIN, _INT64_MAX, optional=True),
            stop=_check_stop(self.stop),
            stop_token_ids=_check_token_ids("stop_token_ids", self.stop_token_ids or ()),
            include_stop_str_in_output=_check_bool("include_stop_str_in_output",
                                                   self.include_stop_str_in_output),
            ignore_eos=_check_bool("ignore_eos", self.ignore_eos),
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            logprobs=_check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS, optional=True),
            prompt_logprobs=_check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS,
                                       optional=True),
            logit_bias=_check_logit_bias(self.logit_bias),
            skip_special_tokens=_check_bool("skip_special_tokens", self.skip_special_tokens),
            spaces_between_special_tokens=_check_bool("spaces_between_special_tokens",
                                                      self.spaces_between_special_tokens),
            speculative=_check_bool("speculative", self.speculative),
        )
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def __hash__(self):
        # logit_bias is a dict (for vLLM-style access); hash it by its items.
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return hash(tuple(tuple(v.items()) if isinstance(v, dict) else v for v in values))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @functools.cached_property
    def sampler_row(self) -> SamplerRow:
        """What the batched sampler reads of these parameters, computed once per request (the
        host packs every running request's row every step)."""
        if self.logit_bias or self.has_penalties or self.logprobs is not None:
            rank = 3
        elif self.greedy:
            rank = 0
        else:
            rank = 2 if self.min_p > 0.0 or self.top_k > 0 or self.top_p < 1.0 else 1
        return SamplerRow(0.0 if self.greedy else self.temperature, self.top_p, self.min_p, self.presence_penalty,
                          self.frequency_penalty, self.repetition_penalty, self.top_k, self.seed or 0, rank)

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def stop_ids(self, eos_token_ids: Iterable[int] = ()) -> frozenset[int]:
        """Token ids that end this request: stop_token_ids, plus eos unless ignore_eos."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(eos_token_ids)
        return frozenset(ids)

    def clone(self, **changes: Any) -> SamplingParams:
        """A validated copy, with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def with_seed(self, seed: int) -> SamplingParams:
        """A copy with `seed` set if it had none (the engine seeds every request on arrival)."""
        return self if self.seed is not None else self.clone(seed=seed)

    def for_sample(self, index: int) -> SamplingParams:
        """Parameters of the `index`-th of the `n` completions (vLLM's convention: seed + index)."""
        _check_int("index", index, 0, self.n - 1)
        seed = self.seed
        if seed is not None:
            # Wrap within int64 so the child's seed stays valid.
            seed = (seed + index - _INT64_MIN) % 2**64 + _INT64_MIN
        return self.clone(n=1, seed=seed)
