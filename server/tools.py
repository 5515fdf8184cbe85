"""What a chat request's `tools` and `tool_choice` mean for its prompt, its sampling and the
reading of its output.

- "none": the tools stay out of the prompt and the answer is plain text.
- "auto" (the default with tools): the tools go into the prompt and the server's
  `--tool-call-parser` reads calls out of the text; it needs `--enable-auto-tool-choice`.
- "required" or a named function: structured output forces the calls' JSON (an array of
  {"name", "parameters"} objects, or the named function's arguments), which is then read back
  into `tool_calls`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from jaxinfer.sampling_params import StructuredOutputsParams
from jaxinfer.server.errors import bad_request
from jaxinfer.server.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from jaxinfer.server.tool_parsers import PARSERS, ToolParser
from jaxinfer.server.tool_parsers.forced import NamedToolParser, RequiredToolParser

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """How one request uses its tools.

    Attributes:
      template_tools: the tools as the chat template receives them (None: no tools in the prompt).
      parser: reads calls out of the output (None: the output is plain text).
      constraint: the structured output that forces the calls (None unless forced).
      max_calls: calls to report (1 when parallel_tool_calls is false).
    """

    template_tools: list[dict[str, Any]] | None = None
    parser: ToolParser | None = None
    constraint: StructuredOutputsParams | None = None
    max_calls: int | None = None


def _parameters(tool: Tool) -> dict[str, Any]:
    return copy.deepcopy(tool.function.parameters) if tool.function.parameters else dict(EMPTY_PARAMETERS)


def required_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """The JSON schema of a non-empty array of calls to `tools`.

    Each tool's `$defs` move to the root, where the `#/$defs/...` references inside its
    parameters point once the parameters are nested in the array."""
    defs: dict[str, Any] = {}
    options = []
    for tool in tools:
        parameters = _parameters(tool)
        for name, definition in parameters.pop("$defs", {}).items():
            if defs.setdefault(name, definition) != definition:
                raise bad_request(f"tools: two tools define $defs.{name} differently", "tools")
        options.append({"type": "object", "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                                         "parameters": parameters},
                        "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def plan_tools(body: ChatCompletionRequest, parser_name: str | None) -> ToolPlan:
    """The plan for `body`, given the server's `--tool-call-parser` (None when auto tool choice
    is off). A 400 when the request asks for what the server cannot do."""
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if not body.tools or choice == "none":
        return ToolPlan()
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    max_calls = None if body.parallel_tool_calls else 1
    if choice == "auto":
        if parser_name is None:
            raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                              "set on the server; use tool_choice 'required', a named function or 'none'",
                              "tool_choice")
        return ToolPlan(tools, PARSERS[parser_name](), None, max_calls)
    if choice == "required":
        schema = required_schema(body.tools, body.parallel_tool_calls)
        return ToolPlan(tools, RequiredToolParser(), StructuredOutputsParams(json=schema), max_calls)
    assert isinstance(choice, NamedToolChoice)
    tool = next(t for t in body.tools if t.function.name == choice.function.name)
    return ToolPlan(tools, NamedToolParser(tool.function.name), StructuredOutputsParams(json=_parameters(tool)), 1)
