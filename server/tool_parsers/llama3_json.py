"""Llama 3.x JSON tool calls: the reply is `{"name": "f", "parameters": {...}}` (optionally after
`<|python_tag|>`), several calls separated by `;`. A reply that starts with anything else is
plain text."""

from __future__ import annotations

from jaxinfer.server.tool_parsers.base import Parsed, ToolParser, call_from_object
from jaxinfer.server.tool_parsers.json_scan import skip_ws

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    keep_special_tokens = True  # <|python_tag|> is a special token

    def parse(self, text: str, final: bool) -> Parsed:
        i = skip_ws(text, 0)
        if text.startswith(PYTHON_TAG, i):
            i = skip_ws(text, i + len(PYTHON_TAG))
        elif i < len(text) and PYTHON_TAG.startswith(text[i:]) and not final:
            return Parsed("", [])  # perhaps the tag, still arriving
        if i >= len(text):
            return Parsed(text if final else "", [])
        if text[i] != "{":
            return Parsed(text, [])
        calls = []
        while i < len(text) and text[i] == "{":
            call, end = call_from_object(text, i)
            calls.append(call)
            if end is None:
                break
            i = skip_ws(text, end)
            if i < len(text) and text[i] == ";":
                i = skip_ws(text, i + 1)
        return Parsed("", calls)
