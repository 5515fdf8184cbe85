"""Finds where JSON values begin and end in text that may still be growing.

Tool calls arrive a few characters at a time; these scanners say how much of a call's JSON has
arrived (a key's value is complete, or still open) without parsing partial JSON into objects, so
the raw text of arguments can be streamed exactly as the model writes it.
"""

from __future__ import annotations

import json

_WHITESPACE = " \t\r\n"
_SCALAR = set("0123456789+-.eEtruefalsn")


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def string_end(text: str, i: int) -> int | None:
    """Index just past the JSON string opening at text[i] ('"'), or None if it is not closed yet."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """Index just past the JSON value starting at text[i], or None if the text ends inside it.

    Only the value's extent is found (brackets balanced outside strings); whether it is valid
    JSON is for json.loads to say once it is complete. A number or literal that reaches the end of
    the text counts as open, since more digits may follow."""
    c = text[i]
    if c == '"':
        return string_end(text, i)
    if c in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                end = string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i
    while j < len(text) and text[j] in _SCALAR:
        j += 1
    if j == i:
        return i + 1  # not JSON: one character, for json.loads to reject
    return j if j < len(text) else None


def object_fields(text: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The top-level fields of the JSON object starting at text[i] (after whitespace).

    Returns (key -> (value start, value end or None while open), index past the closing brace or
    None while the object is open or malformed)."""
    fields: dict[str, tuple[int, int | None]] = {}
    i = skip_ws(text, i)
    if i >= len(text) or text[i] != "{":
        return fields, None
    i += 1
    while True:
        i = skip_ws(text, i)
        if i >= len(text):
            return fields, None
        if text[i] == "}":
            return fields, i + 1
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            return fields, None
        key_end = string_end(text, i)
        if key_end is None:
            return fields, None
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= len(text) or text[i] != ":":
            return fields, None
        i = skip_ws(text, i + 1)
        if i >= len(text):
            return fields, None
        end = value_end(text, i)
        fields[key] = (i, end)
        if end is None:
            return fields, None
        i = end
