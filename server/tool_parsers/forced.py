"""Reading calls out of output that `tool_choice` forced through structured output: for
"required", a JSON array of {"name", "parameters"} objects; for a named function, the JSON of
its arguments alone."""

from __future__ import annotations

from jaxinfer.server.tool_parsers.base import Parsed, ParsedCall, ToolParser
from jaxinfer.server.tool_parsers.json_scan import skip_ws, value_end
from jaxinfer.server.tool_parsers.mistral import array_calls


class RequiredToolParser(ToolParser):
    name = "required"

    def parse(self, text: str, final: bool) -> Parsed:
        return Parsed("", array_calls(text, 0))


class NamedToolParser(ToolParser):
    """The whole output is the arguments of `function`."""

    name = "named"

    def __init__(self, function: str):
        self.function = function

    def parse(self, text: str, final: bool) -> Parsed:
        start = skip_ws(text, 0)
        end = value_end(text, start) if start < len(text) else None
        return Parsed("", [ParsedCall(self.function, text[start:] if end is None else text[start:end],
                                      end is not None or final)])
