"""What every tool call parser shares: the parsed view of a model's text, and turning it into
OpenAI's `tool_calls` (whole, or as streamed deltas).

A parser only says how far the text has got: the content before any call, and each call's name
(once complete) and the raw text of its arguments so far. Both non-streamed extraction and
streaming are built on that one view, so they cannot disagree about what a text contains.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from jaxinfer.server.tool_parsers.json_scan import object_fields


@dataclasses.dataclass
class ParsedCall:
    name: str | None  # None until the name is complete
    arguments: str  # the raw JSON text of the arguments so far
    complete: bool  # the arguments' JSON value has ended


@dataclasses.dataclass
class Parsed:
    content: str  # text outside tool calls (so far)
    calls: list[ParsedCall]


def call_from_object(text: str, start: int, argument_keys=("arguments", "parameters")) -> tuple[ParsedCall, int | None]:
    """The call written as a JSON object {"name": ..., "arguments": {...}} at text[start:], and
    the index past the object (None while it is open)."""
    fields, end = object_fields(text, start)
    name = None
    if "name" in fields and fields["name"][1] is not None:
        s, e = fields["name"]
        value = json.loads(text[s:e]) if text[s] == '"' else None
        name = value if isinstance(value, str) else None
    arguments, complete = "", False
    for key in argument_keys:
        if key in fields:
            s, e = fields[key]
            arguments, complete = text[s:e if e is not None else len(text)], e is not None
            break
    return ParsedCall(name, arguments, complete), end


def held_back(text: str, marker: str) -> str:
    """`text` without a tail that could be the start of `marker` (so it is not streamed as content
    before the rest of the marker arrives)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return text[:-k]
    return text


class ToolParser:
    """Reads tool calls out of generated text.

    Attributes:
      name: the `--tool-call-parser` value.
      keep_special_tokens: the format's markers are special tokens, so the text must keep them.
    """

    name = ""
    keep_special_tokens = False

    def parse(self, text: str, final: bool) -> Parsed:
        """The content and calls in `text`; `final` when no more text will come."""
        raise NotImplementedError

    def new_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"

    def extract(self, text: str) -> tuple[str | None, list[dict[str, str]]]:
        """(content, [{"name", "arguments"}]) of a finished text. When a call is incomplete or not
        valid JSON, the whole text is plain content and there are no calls."""
        parsed = self.parse(text, final=True)
        calls = []
        for call in parsed.calls:
            try:
                arguments = json.loads(call.arguments) if call.arguments.strip() else {}
            except json.JSONDecodeError:
                return text, []
            if call.name is None or not call.complete:
                return text, []
            calls.append({"name": call.name, "arguments": json.dumps(arguments, ensure_ascii=False)})
        if not calls:
            return text, []
        return (parsed.content if parsed.content.strip() else None), calls


def tool_calls_field(parser: ToolParser, calls: list[dict[str, str]]) -> list[dict[str, Any]]:
    """OpenAI's `message.tool_calls` for extracted calls, each with a fresh id."""
    return [{"id": parser.new_id(), "type": "function", "function": call} for call in calls]


class ToolCallStream:
    """Turns one choice's streamed text into chat deltas: content, then per call a first delta
    with its id and name and then fragments of its arguments, as OpenAI streams them.

    Args:
      parser: reads the calls.
      max_calls: calls to report (1 when parallel_tool_calls is false); later ones are dropped.
    """

    def __init__(self, parser: ToolParser, max_calls: int | None = None):
        self.parser = parser
        self.max_calls = max_calls
        self.text = ""
        self.content_sent = 0
        self.arguments_sent: list[int] = []  # per started call: characters of arguments sent

    @property
    def called(self) -> bool:
        return bool(self.arguments_sent)

    def feed(self, delta: str, final: bool) -> list[dict[str, Any]]:
        """The chat deltas (each one chunk) for `delta`, the new text; none while nothing can be
        sent yet. A call's first delta carries its id and name, later ones argument fragments."""
        self.text += delta
        parsed = self.parser.parse(self.text, final)
        out: list[dict[str, Any]] = []
        if len(parsed.content) > self.content_sent and not self.called:
            out.append({"content": parsed.content[self.content_sent:]})
            self.content_sent = len(parsed.content)
        calls = parsed.calls[:self.max_calls] if self.max_calls is not None else parsed.calls
        for index, call in enumerate(calls):
            if call.name is None:
                break
            if index == len(self.arguments_sent):
                self.arguments_sent.append(0)
                out.append({"tool_calls": [{"index": index, "id": self.parser.new_id(), "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            fragment = call.arguments[self.arguments_sent[index]:]
            if fragment:
                self.arguments_sent[index] = len(call.arguments)
                out.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
        return out
