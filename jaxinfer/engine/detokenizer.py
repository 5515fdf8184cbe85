"""Incremental detokenization with stop strings, for streaming text as tokens arrive.

Decoding the whole output every step costs O(length) per token and breaks on byte-level BPE
tokens that end inside a multi-byte UTF-8 character. Instead, as in vLLM and TGI, each step
decodes a small window: ids[prefix_offset:read_offset] is text already emitted (context for
tokenizers whose decoding depends on the previous token), ids[read_offset:] is new. The new
text is the window's decode minus the context's, and it is held back while it ends in U+FFFD,
the mark of an incomplete character.

Stop strings are searched in the stable text only where they could end in the new part; the
text is cut at the first match. While streaming, a trailing piece that could still grow into a
stop string is held back until it does or cannot.
"""

from __future__ import annotations

import itertools
from typing import Protocol, Sequence

from jaxinfer.sampling_params import SamplingParams

# Prompt tokens decoded before the first output token, so its leading space (SentencePiece)
# or merge with the previous token comes out as it would in the full text (vLLM uses 5 too).
PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"
_MAX_DECODED_IDS_KEPT = 256


class Tokenizer(Protocol):
    """What the detokenizer needs of a tokenizer (HF tokenizers satisfy it).

    `all_special_ids` is optional; it is read only to set special tokens apart with spaces.
    """

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas, stopping at stop strings.

    Args:
      tokenizer: see `Tokenizer`.
      prompt_token_ids: the prompt; its last tokens give the first output token context.
      skip_special_tokens: leave special tokens out of the text.
      spaces_between_special_tokens: when special tokens are kept, join them to the text
        around them with single spaces (the convention of HF's Python tokenizers).
      stop: stop strings; the text ends at the first one found.
      include_stop_str_in_output: keep the matched stop string (and a stop token's text).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._special_ids = frozenset()
        if not skip_special_tokens and spaces_between_special_tokens:
            self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self._ids = [int(t) for t in prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]]
        self._context_len = len(self._ids)
        # A prompt ending inside a character would glue its bytes onto the output's: the
        # output is then decoded on its own, as if there were no prompt.
        if self._decode(0).endswith(_INCOMPLETE):
            self._ids, self._context_len = [], 0
        self._prefix_offset = 0
        self._read_offset = self._context_len
        self._text = ""  # stable output text, cut at the stop string once one matched
        self._emitted = 0  # how much of _text the deltas returned so far
        self._stop_matched: str | None = None
        self._finished = False

    @classmethod
    def from_params(cls, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                    params: SamplingParams) -> IncrementalDetokenizer:
        return cls(tokenizer, prompt_token_ids, params.skip_special_tokens,
                   params.spaces_between_special_tokens, params.stop,
                   params.include_stop_str_in_output)

    @property
    def output_text(self) -> str:
        """The text returned so far (the concatenated deltas)."""
        return self._text[:self._emitted]

    @property
    def stop_matched(self) -> str | None:
        return self._stop_matched

    def add_tokens(self, new_ids: Sequence[int], *, last_is_stop_token: bool = False
                   ) -> tuple[str, str | None]:
        """Appends generated ids; returns (new text, the stop string matched or None).

        Args:
          new_ids: ids generated since the last call (several with speculative decoding).
          last_is_stop_token: the last id is an eos or stop token id ending the request; its
            text is left out unless include_stop_str_in_output.
        Once a stop string matched the request is over: later calls raise RuntimeError.
        """
        if self._finished:
            raise RuntimeError("add_tokens after the detokenizer finished (stop string or finish())")
        if last_is_stop_token and not self.include_stop_str_in_output:
            new_ids = new_ids[:-1]
        text_before = len(self._text)
        for token_id in new_ids:
            self._ids.append(int(token_id))
            self._advance(flush=False)
        if self._find_stop(text_before):
            return self._take_delta(hold=0), self._stop_matched
        return self._take_delta(hold=self._partial_stop_length()), None

    def finish(self) -> str:
        """Ends the request (for a reason other than a stop string): returns all held text."""
        if self._finished:
            return ""
        self._advance(flush=True)
        self._finished = True
        return self._take_delta(hold=0)

    def _decode(self, start: int, end: int | None = None) -> str:
        """Text of self._ids[start:end]."""
        ids = self._ids[start:end]
        if not self._special_ids:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        text = ""
        groups = itertools.groupby(enumerate(ids, start), lambda item: item[1] in self._special_ids)
        for special, group in groups:
            group = list(group)
            first, group_ids = group[0][0], [token_id for _, token_id in group]
            if special:
                part = " ".join(self.tokenizer.convert_ids_to_tokens(group_ids))
            else:
                part = self.tokenizer.decode(group_ids, skip_special_tokens=False)
            # No space where the output begins: its text must not depend on the prompt's tokens.
            text += part if not text or first == self._context_len else " " + part
        return text

    def _advance(self, *, flush: bool):
        """Moves the newest ids' text into _text once it is complete (or at once if flush)."""
        if self._read_offset == len(self._ids):
            return
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset)
        if not flush and (len(window_text) <= len(prefix_text) or window_text.endswith(_INCOMPLETE)):
            return
        self._text += window_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset > _MAX_DECODED_IDS_KEPT:  # ids before the window are never read
            del self._ids[:self._prefix_offset]
            self._context_len -= self._prefix_offset
            self._prefix_offset, self._read_offset = 0, self._read_offset - self._prefix_offset

    def _find_stop(self, text_before: int) -> bool:
        """Cuts _text at the earliest stop string ending in the new text, if any."""
        best = None
        for stop in self.stop:
            # Only matches that end past text_before are new.
            index = self._text.find(stop, max(0, text_before - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return False
        index, stop = best
        self._text = self._text[:index + len(stop) if self.include_stop_str_in_output else index]
        self._stop_matched = stop
        self._finished = True
        return True

    def _partial_stop_length(self) -> int:
        """Length of the longest end of _text that begins some stop string."""
        if self.include_stop_str_in_output:
            return 0  # the text is output whether or not the stop string completes
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _take_delta(self, *, hold: int) -> str:
        end = max(self._emitted, len(self._text) - hold)
        delta = self._text[self._emitted:end]
        self._emitted = end
        return delta
