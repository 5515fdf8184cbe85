"""Mistral tool calls: `[TOOL_CALLS]` then a JSON array `[{"name": "f", "arguments": {...}}]`, or in
newer tokenizers `[TOOL_CALLS]f[ARGS]{...}` per call. Mistral's templates require tool call ids
of 9 letters and digits."""

from __future__ import annotations

import random
import string

from jaxinfer.server.tool_parsers.base import Parsed, ParsedCall, ToolParser, call_from_object, held_back
from jaxinfer.server.tool_parsers.json_scan import skip_ws, value_end

BOT, ARGS = "[TOOL_CALLS]", "[ARGS]"
_ID_ALPHABET = string.ascii_letters + string.digits


def array_calls(text: str, i: int) -> list[ParsedCall]:
    """The calls of a JSON array of call objects starting at text[i] (after whitespace)."""
    i = skip_ws(text, i)
    if i >= len(text) or text[i] != "[":
        return []
    i += 1
    calls = []
    while True:
        i = skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i >= len(text) or text[i] != "{":
            return calls
        call, end = call_from_object(text, i)
        calls.append(call)
        if end is None:
            return calls
        i = end


class MistralToolParser(ToolParser):
    name = "mistral"
    keep_special_tokens = True  # [TOOL_CALLS] is a special token

    def new_id(self) -> str:
        return "".join(random.choices(_ID_ALPHABET, k=9))

    def parse(self, text: str, final: bool) -> Parsed:
        first = text.find(BOT)
        if first < 0:
            return Parsed(text if final else held_back(text, BOT), [])
        rest = first + len(BOT)
        if skip_ws(text, rest) < len(text) and text[skip_ws(text, rest)] == "[":
            return Parsed(text[:first], array_calls(text, rest))
        return Parsed(text[:first], self._named_calls(text, rest))

    @staticmethod
    def _named_calls(text: str, i: int) -> list[ParsedCall]:
        calls = []
        while True:
            marker = text.find(ARGS, i)
            if marker < 0:
                return calls
            start = skip_ws(text, marker + len(ARGS))
            end = value_end(text, start) if start < len(text) else None
            calls.append(ParsedCall(text[i:marker].strip(), text[start:end if end is not None else len(text)],
                                    end is not None))
            if end is None:
                return calls
            following = text.find(BOT, end)
            if following < 0:
                return calls
            i = following + len(BOT)
