"""Tool call parsers by `--tool-call-parser` name (vLLM's names)."""

from __future__ import annotations

from jaxinfer.server.tool_parsers.base import ToolCallStream, ToolParser, tool_calls_field
from jaxinfer.server.tool_parsers.hermes import HermesToolParser
from jaxinfer.server.tool_parsers.llama3_json import Llama3JsonToolParser
from jaxinfer.server.tool_parsers.mistral import MistralToolParser

PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
    MistralToolParser.name: MistralToolParser,
}

__all__ = ["PARSERS", "ToolCallStream", "ToolParser", "tool_calls_field"]
