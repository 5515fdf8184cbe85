"""Grammar-constrained decoding on the host: llguidance matchers and their token bitmasks.

`StructuredOutputs` belongs to one engine. It builds the llguidance tokenizer from the
engine's tokenizer the first time a structured request arrives (plain engines never pay for
it), validates each new constraint at admission (an invalid one raises ValueError naming the
field) and compiles it in a thread pool, hands each request a matcher copied from the compiled
template when first used, and fills the allowed-token bitmask of a step's structured rows
as packed int32 words [rows, ceil(V / 32)] (bit j of word w allows token 32 w + j), the form
the device unpacks (`sampling.apply_token_bitmask`).

A matcher only ever consumes tokens the scheduler accepted, so a token dropped because its
request stopped a step late, or sampled by a step planned before a preemption, needs no
rollback: the matcher simply never saw it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import os
import sys
import threading
import time
from typing import Sequence

import numpy as np

from jaxinfer.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Compiled grammars kept per engine, by constraint: a repeated schema costs a deep copy.
GRAMMAR_CACHE_SIZE = 128
COMPILE_THREADS = 8  # at most; fewer on smaller hosts
GIL_SWITCH_INTERVAL_S = 2e-4  # the process's switch interval while a mask fills (see `fill_bitmask_async`)


class _ShortSwitchInterval:
    """The process's GIL switch interval at most GIL_SWITCH_INTERVAL_S while any holder is in
    (the mask threads of several engines, e.g. data-parallel replicas, may overlap); the
    interval from before the first holder entered comes back when the last one leaves."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._saved = None

    def enter(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, GIL_SWITCH_INTERVAL_S))
            self._holders += 1

    def exit(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                sys.setswitchinterval(self._saved)


_SHORT_SWITCH_INTERVAL = _ShortSwitchInterval()


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint (not yet checked: `LLMatcher` checks it).

    JSON whitespace follows vLLM: free whitespace between tokens unless
    `disable_any_whitespace`, which keeps outputs compact (and bounded for a model that would
    otherwise emit whitespace forever).
    """
    import llguidance

    kind = params.kind
    json_options = {"whitespace_flexible": not params.disable_any_whitespace}
    if kind in ("json", "json_object"):
        schema = params.json if kind == "json" else {"type": "object"}
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"structured_outputs.json must be a JSON object (a schema), got "
                             f"{type(schema).__name__}")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=json_options)
        except (ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.json is not a usable schema: {e}") from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if kind == "structural_tag":
        return structural_tag_grammar(params.structural_tag)
    if kind == "choice":
        # Lark string literals take JSON's escapes, so any choice text is quoted exactly.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in params.choice))
    try:
        return llguidance.grammar_from("grammar", params.grammar)  # Lark, or GBNF converted to it
    except ValueError as e:
        raise ValueError(f"structured_outputs.grammar: {e}") from None


def structural_tag_grammar(text: str) -> str:
    """The Lark grammar of vLLM's structural tag: free text, in which each trigger can only start
    one of the structures that begin with it, whose body is JSON of the structure's schema."""
    import llguidance

    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"structured_outputs.structural_tag is not valid JSON: {e}") from None
    structures, triggers = spec.get("structures") if isinstance(spec, dict) else None, spec.get("triggers", [])
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list) or not triggers:
        raise ValueError("structured_outputs.structural_tag needs non-empty 'structures' and 'triggers' lists")
    tags = []
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("begin", "end")):
            raise ValueError(f"structured_outputs.structural_tag: structures[{i}] needs 'begin' and 'end' strings")
        trigger = next((t for t in triggers if isinstance(t, str) and t and s["begin"].startswith(t)), None)
        if trigger is None:
            raise ValueError(f"structured_outputs.structural_tag: no trigger starts structures[{i}].begin "
                             f"{s['begin']!r}")
        schema = s.get("schema") or {}
        if not isinstance(schema, dict):
            raise ValueError(f"structured_outputs.structural_tag: structures[{i}].schema must be an object")
        tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"], grammar=schema, end=s["end"]))
    # Triggers are matched as text: a model's special-token spelling is text in its vocabulary too.
    return llguidance.StructTag.to_grammar(tags, assume_special=False)


class Grammar:
    """One request's matcher: advanced by its accepted tokens; terminated once nothing can follow.

    Built from a compiled template, which may still be compiling in the engine's pool (a
    future): the matcher is copied from it on first use, after the request's forward pass is
    queued, so many new grammars compile in parallel with each other and with the device."""

    __slots__ = ("_matcher", "_template", "_stopped", "num_consumed", "failed", "compile_error")

    def __init__(self, matcher=None, template: "concurrent.futures.Future | None" = None):
        self._matcher = matcher
        self._template = template
        # The matcher's is_stopped() as of its last token (None: not asked yet), kept so that
        # `is_terminated` never touches a matcher while a mask is being filled in another thread.
        self._stopped = None
        self.num_consumed = 0
        self.failed = False  # a token the grammar rejected (only a conflicting constraint can cause it)
        # Why the pooled compile of a validated constraint failed (an llguidance defect), or
        # None: the grammar is then terminated and its request is aborted, not the engine.
        self.compile_error: str | None = None

    @property
    def matcher(self):
        """The matcher (copied from the compiled template on first use), or None if the
        template failed to compile."""
        if self._matcher is None and self.compile_error is None:
            try:
                self._matcher = self._template.result().deep_copy()
            except Exception as e:  # noqa: BLE001 - whatever the pool raised ends this request only
                self.compile_error = f"{type(e).__name__}: {e}"
                self.failed = True
                logger.error("grammar failed to compile in the pool: %s", self.compile_error)
                return None
            finally:
                if self._matcher is not None:
                    self._template = None
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advances past an accepted token; False if the grammar rejected it."""
        if self.is_terminated:
            return not self.failed
        if not self.matcher.consume_token(token_id):
            self.failed = True
            logger.warning("grammar rejected token %d: %s", token_id, self.matcher.get_error())
            return False
        self.num_consumed += 1
        self._stopped = self.matcher.is_stopped()
        return True

    @property
    def is_terminated(self) -> bool:
        """No further token can extend the output: the request is done ("stop")."""
        if self.failed:
            return True
        if self._stopped is None:
            matcher = self.matcher
            if matcher is None:  # the compile failed
                return True
            self._stopped = matcher.is_stopped()
        return self._stopped

    def fork(self) -> "Grammar":
        if self._matcher is None:  # not used yet (maybe still compiling, or failed): shares the template
            return Grammar(template=self._template)
        return Grammar(self.matcher.deep_copy())


class StructuredOutputs:
    """Per-engine grammar state: the llguidance tokenizer, compiled grammars, mask filling.

    Args:
      tokenizer: the engine's `jaxinfer.tokenizer.Tokenizer` (its Rust backend is serialized
        for llguidance), or None (structured requests are then refused).
      vocab_size: V of the model's logits (may exceed the tokenizer's; extra ids are never
        allowed).
      eos_token_ids: ids the grammar allows once the output may end.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.num_words = -(-vocab_size // 32)
        self._eos = list(eos_token_ids)
        self._ll_tokenizer = None
        self._executor = None
        self._compile_pool = None
        self._mask_thread = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[StructuredOutputsParams, object] = collections.OrderedDict()
        # Counters for benchmarks: grammar compiles (cache misses), mask fills, token advances.
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self.num_mask_steps = 0
        self.mask_seconds = 0.0
        self.accept_seconds = 0.0

    def _tokenizer_for_grammars(self):
        if self._tokenizer is None:
            raise ValueError("structured_outputs needs a tokenizer; this model has none")
        if not hasattr(self._tokenizer, "backend"):
            raise ValueError("structured_outputs needs a tokenizer built from tokenizer.json or a GGUF "
                             f"(jaxinfer.tokenizer.Tokenizer), got {type(self._tokenizer).__name__}")
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                t0 = time.perf_counter()
                self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer.backend.to_str(),
                                                            n_vocab=self.vocab_size, eos_token=self._eos or None)
                self._executor = llguidance.LLExecutor()
                self._mask_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
                # llguidance compiles outside the GIL: a batch of new schemas compiles in parallel.
                self._compile_pool = concurrent.futures.ThreadPoolExecutor(
                    min(COMPILE_THREADS, os.cpu_count() or 1), thread_name_prefix="grammar-compile")
                logger.info("built the grammar tokenizer in %.2f s", time.perf_counter() - t0)
        return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """A fresh matcher for `params`; raises ValueError naming the field when it is invalid.

        A constraint not seen before is validated here (about a third of a compile's cost) and
        compiled in the pool; the returned grammar waits for it only when first used."""
        import llguidance

        ll_tokenizer = self._tokenizer_for_grammars()
        key = params  # hashable, and equal for equal schemas (dicts compare by value)
        template = self._cache.get(key)
        if template is not None and template.done() and template.exception() is not None:
            template = None  # a pooled compile that failed is compiled again, not served
        if template is None:
            text = grammar_text(params)
            error = llguidance.LLMatcher.validate_grammar(text, ll_tokenizer)
            if error:
                raise ValueError(f"structured_outputs.{params.kind} is invalid: {error}")
            template = self._remember(key, self._compile_pool.submit(self._build, ll_tokenizer, text, params.kind))
        else:
            self._cache.move_to_end(key)
        return Grammar(template=template)

    def prepare(self, constraints: Sequence[StructuredOutputsParams]) -> None:
        """Compiles the distinct constraints of a batch not compiled yet, all at once in the
        pool, so that admitting the batch finds each one compiled (one request at a time, each
        new constraint is validated on the caller's thread). Raises ValueError naming the field
        for the first invalid one; the valid ones stay compiled."""
        texts = {}
        for params in constraints:
            if params not in self._cache and params not in texts:
                texts[params] = grammar_text(params)
        if not texts:
            return
        ll_tokenizer = self._tokenizer_for_grammars()
        jobs = {params: self._compile_pool.submit(self._compile_text, ll_tokenizer, text)
                for params, text in texts.items()}
        first_error = None
        for params, job in jobs.items():
            template, error = job.result()
            if error:
                first_error = first_error or ValueError(f"structured_outputs.{params.kind} is invalid: {error}")
                continue
            compiled = concurrent.futures.Future()
            compiled.set_result(template)
            self._remember(params, compiled)
        if first_error is not None:
            raise first_error

    def _remember(self, key: StructuredOutputsParams, template: concurrent.futures.Future) -> concurrent.futures.Future:
        """Caches a (compiling or compiled) template, the least recently used one leaving."""
        self._cache[key] = template
        if len(self._cache) > GRAMMAR_CACHE_SIZE:
            self._cache.popitem(last=False)
        return template

    def _build(self, ll_tokenizer, text: str, kind: str):
        """The compiled template of a validated grammar (in a pool thread)."""
        template, error = self._compile_text(ll_tokenizer, text)
        if error:  # validation passed, so this would be an llguidance defect
            raise RuntimeError(f"structured_outputs.{kind} failed to compile: {error}")
        return template

    def _compile_text(self, ll_tokenizer, text: str) -> tuple:
        """(the compiled matcher, "") or (None, llguidance's error), in a pool thread."""
        import llguidance

        t0 = time.perf_counter()
        template = llguidance.LLMatcher(ll_tokenizer, text, log_level=0)
        if template.is_error():
            return None, template.get_error()
        with self._lock:
            self.num_compiles += 1
            self.compile_seconds += time.perf_counter() - t0
        return template, ""

    def _eos_row(self) -> np.ndarray:
        """A packed mask row allowing only the end-of-sequence ids (all tokens if none)."""
        if not self._eos:
            return np.full(self.num_words, -1, np.int32)
        row = np.zeros(self.num_words, np.uint32)
        for t in self._eos:
            if t < self.vocab_size:
                row[t // 32] |= np.uint32(1 << (t % 32))
        return row.view(np.int32)

    def accept_tokens(self, pairs: Sequence[tuple[Grammar, int]]) -> None:
        """Advances each grammar past its accepted token, all rows in parallel (llguidance's
        threads, outside the GIL): this sits on the path from reading a step's tokens to
        queuing the next step's sampler."""
        t0 = time.perf_counter()
        live = [(g, t) for g, t in pairs if not g.is_terminated]
        if len(live) == 1:
            live[0][0].accept(live[0][1])
        elif live:
            results = self._executor.consume_token_par([(g.matcher, t) for g, t in live])
            for (g, t), ok in zip(live, results):
                if ok:
                    g.num_consumed += 1
                    g._stopped = g.matcher.is_stopped()
                else:
                    g.failed = True
                    logger.warning("grammar rejected token %d: %s", t, g.matcher.get_error())
        self.accept_seconds += time.perf_counter() - t0

    def fill_bitmask_async(self, grammars: Sequence[Grammar | None]) -> concurrent.futures.Future:
        """`fill_bitmask` in the mask thread, returning once that thread runs (so the caller's
        Python work that follows overlaps the fill, which runs outside the GIL). Until the
        future is done, the caller must not touch these grammars' matchers (`is_terminated`
        of a grammar that has taken a token does not)."""
        started = threading.Event()
        # The mask thread needs the GIL back once llguidance is done, and a thread waiting for
        # it is served only after the interpreter's switch interval (5 ms by default) unless
        # the holder blocks: masks filled in ~1 ms reached the engine thread 2-3 ms late at
        # batch 64 (benchmarks/NOTES.md). So the interval is short while a fill runs, and
        # restored by the mask thread once it holds the GIL again.
        _SHORT_SWITCH_INTERVAL.enter()

        def job():
            started.set()
            try:
                return self.fill_bitmask(grammars)
            finally:
                _SHORT_SWITCH_INTERVAL.exit()

        future = self._mask_thread.submit(job)
        # Waiting releases the GIL: the thread takes it now, not after the interpreter's switch
        # interval (5 ms), and gives it back when llguidance starts filling.
        started.wait()
        return future

    def fill_bitmask(self, grammars: Sequence[Grammar | None]) -> np.ndarray:
        """The packed mask [len(grammars), ceil(V / 32)] int32: each grammar's allowed tokens
        in its row, every token allowed in rows without one (None)."""
        import llguidance.numpy

        t0 = time.perf_counter()
        bitmask = np.full((len(grammars), self.num_words), -1, np.int32)
        live = [(g.matcher, i) for i, g in enumerate(grammars) if g is not None and not g.is_terminated]
        for i, g in enumerate(grammars):
            if g is not None and g.compile_error is not None:
                bitmask[i] = self._eos_row()  # its request is aborted; its last token is dropped
        if live:
            # Rows are filled in parallel by llguidance's threads, outside the GIL.
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, live, bitmask)
        self.num_mask_steps += 1
        self.mask_seconds += time.perf_counter() - t0
        return bitmask

