"""Hermes-style tool calls, as Qwen2.5/Qwen3 and Hermes models write them:
`<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, one block per call, after any
plain text."""

from __future__ import annotations

from jaxinfer.server.tool_parsers.base import Parsed, ToolParser, call_from_object, held_back

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str, final: bool) -> Parsed:
        first = text.find(START)
        if first < 0:
            return Parsed(text if final else held_back(text, START), [])
        calls = []
        at = first
        while at >= 0:
            body_start = at + len(START)
            body_end = text.find(END, body_start)
            body = text[body_start:] if body_end < 0 else text[body_start:body_end]
            call, _ = call_from_object(body, 0)
            calls.append(call)
            if body_end < 0:
                break
            at = text.find(START, body_end + len(END))
        return Parsed(text[:first], calls)
