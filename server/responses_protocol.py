"""The request body of POST /v1/responses, its input as chat messages, and the bounded store that
`previous_response_id` reads."""

from __future__ import annotations

import collections
import threading
from typing import Any, Literal

from pydantic import Field, model_validator

from jaxinfer.server.protocol import MAX_MESSAGES, SamplingFields, StrictModel, _int

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

    input: str | list[InputMessage] = Field(..., description="a user message as a string, or input items")
    instructions: str | None = Field(None, description="a system message; not carried to follow-up responses")
    max_output_tokens: _int(ge=1) | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: _int(ge=0, le=20) | None = None

    @model_validator(mode="after")
    def _check_responses(self):
        if self.n != 1:
            raise ValueError("n: a response has one output; n must be 1")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input: must not be empty")
        if isinstance(self.input, list) and len(self.input) > MAX_MESSAGES:
            raise ValueError(f"input: at most {MAX_MESSAGES} items are allowed")
        if self.tools:
            raise ValueError("tools: tools are not supported on /v1/responses; use /v1/chat/completions")
        if self.stream_options is not None:
            raise ValueError("stream_options: not a field of /v1/responses")
        return self

    def input_messages(self) -> list[dict[str, str]]:
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [m.as_template_dict() for m in self.input]


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
