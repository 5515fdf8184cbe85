"""The request body of POST /v1/responses, its input as chat messages, and the bounded store that
`previous_response_id` reads."""

from __future__ import annotations

import collections
import json
import threading
from typing import Any, Literal, Union

from pydantic import Field, model_validator

from jaxinfer.server.protocol import (MAX_MESSAGES, FunctionDefinition, FunctionName, NamedToolChoice,
                                      SamplingFields, StrictModel, Tool, _int)

DEFAULT_MAX_STORED_RESPONSES = 1024


class InputText(StrictModel):
    # Earlier responses' items carry output_text parts; they go back in as they came out.
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def as_template_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class FunctionCallItem(StrictModel):
    """A call an earlier response made, given back as input (before its output)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None

    def as_template_call(self) -> dict[str, Any]:
        """The call as tool-use chat templates read it (arguments as an object)."""
        try:
            arguments = json.loads(self.arguments) if self.arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"input: function_call {self.call_id!r} has arguments that are not JSON ({e})")
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


class FunctionCallOutputItem(StrictModel):
    """What a call returned, for the model's next turn."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


class FunctionTool(StrictModel):
    """The Responses API's function tool (flat, where chat nests it under `function`)."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def as_chat_tool(self) -> Tool:
        return Tool(type="function", function=FunctionDefinition(name=self.name, description=self.description,
                                                                 parameters=self.parameters))


class FunctionToolChoice(StrictModel):
    type: Literal["function"]
    name: str


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(StrictModel):
    format: TextFormat | None = None


class ResponsesRequest(SamplingFields):
    """POST /v1/responses (stateless generation; `previous_response_id` continues a stored one)."""

    input: str | list[Union[InputMessage, FunctionCallItem, FunctionCallOutputItem]] = Field(
        ..., description="a user message as a string, or input items (messages, function calls and their outputs)")
    instructions: str | None = Field(None, description="a system message; not carried to follow-up responses")
    max_output_tokens: _int(ge=1) | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = True
    top_logprobs: _int(ge=0, le=20) | None = None

    @model_validator(mode="after")
    def _check_responses(self):
        if self.n != 1:
            raise ValueError("n: a response has one output; n must be 1")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input: must not be empty")
        if isinstance(self.input, list) and len(self.input) > MAX_MESSAGES:
            raise ValueError(f"input: at most {MAX_MESSAGES} items are allowed")
        for item in self.input if isinstance(self.input, list) else ():
            if isinstance(item, FunctionCallItem):
                item.as_template_call()  # arguments must be JSON
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: needs tools to choose from")
        if isinstance(self.tool_choice, FunctionToolChoice) and self.tool_choice.name not in {
                t.name for t in self.tools}:
            raise ValueError(f"tool_choice: the function {self.tool_choice.name!r} is not among the request's tools")
        if self.stream_options is not None:
            raise ValueError("stream_options: not a field of /v1/responses")
        return self

    def input_messages(self) -> list[dict[str, Any]]:
        """The input as chat-template messages: consecutive function calls become one assistant
        message with tool_calls, their outputs tool messages."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        messages: list[dict[str, Any]] = []
        for item in self.input:
            if isinstance(item, FunctionCallItem):
                if not (messages and messages[-1].get("role") == "assistant" and "tool_calls" in messages[-1]):
                    messages.append({"role": "assistant", "content": "", "tool_calls": []})
                messages[-1]["tool_calls"].append(item.as_template_call())
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            else:
                messages.append(item.as_template_dict())
        return messages

    def chat_tools(self):
        """tools, tool_choice and parallel_tool_calls as the chat endpoint names them (what
        `plan_tools` reads)."""
        from types import SimpleNamespace

        choice = self.tool_choice
        if isinstance(choice, FunctionToolChoice):
            choice = NamedToolChoice(type="function", function=FunctionName(name=choice.name))
        return SimpleNamespace(tools=[t.as_chat_tool() for t in self.tools or ()] or None, tool_choice=choice,
                               parallel_tool_calls=self.parallel_tool_calls)


class ResponseStore:
    """The most recent responses by id, with the conversation each one ends (least recently
    used dropped first), for `previous_response_id` and GET /v1/responses/{id}.

    Args:
      max_entries: how many responses are kept.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_STORED_RESPONSES):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[str, tuple[list[dict], dict]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, response_id: str, conversation: list[dict], response: dict) -> None:
        with self._lock:
            self._entries[response_id] = (conversation, response)
            self._entries.move_to_end(response_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def get(self, response_id: str) -> tuple[list[dict], dict] | None:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is not None:
                self._entries.move_to_end(response_id)
            return entry

    def __len__(self) -> int:
        return len(self._entries)
