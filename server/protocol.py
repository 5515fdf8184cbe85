"""Request bodies of the OpenAI API (with vLLM's sampling extras), as pydantic models.

Field names, defaults and ranges follow OpenAI's API reference; where vLLM accepts more (top_k,
min_p, repetition_penalty, ...) so do we, under vLLM's names. Types are strict: a string where a
number belongs is a 400, not a silent conversion. Unknown fields are ignored, as vLLM does, so
newer clients that send fields this server does not know still work.

Responses are built as plain dicts in the route modules: their shape is fixed by the API and
checked by the tests with the official client.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_N = 16  # completions per prompt; each is a sequence in the engine
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 1024  # characters in one stop string
MAX_LOGPROBS = 20
MAX_MESSAGES = 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1



def _whole_number(value):
    # JSON Schema counts 10.0 as an integer and so do some clients; strict pydantic would not.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _int(**bounds):
    """An integer type within `bounds` (ge=, le=) that also takes whole floats such as 10.0.

    The bounds come before the validator, or pydantic leaves them out of the JSON schema."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole_number)]


TokenIds = list[_int(ge=0)]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class JsonSchemaFormat(StrictModel):
    name: str
    description: str | None = None
    # "schema" would shadow a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class StructuralTagStructure(StrictModel):
    begin: str
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    end: str


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    # vLLM's structural tag format: free text, each trigger opening a tagged JSON region.
    structures: list[StructuralTagStructure] | None = None
    triggers: list[str] | None = None


class StructuredOutputsRequest(StrictModel):
    """vLLM's `structured_outputs` request field (one constraint, as StructuredOutputsParams)."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False

    def model_dump(self, **kwargs):
        return super().model_dump(by_alias=True, **kwargs)


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(StrictModel):
    """Fields that both endpoints turn into SamplingParams."""

    model: str | None = Field(None, description="a served model name; the first served name when omitted")
    n: _int(ge=1, le=MAX_N) = 1
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: _int(ge=-1) | None = Field(None, description="0 or -1 disables top-k")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: _int(ge=INT64_MIN, le=INT64_MAX) | None = None
    stop: str | list[str] | None = None
    stop_token_ids: TokenIds | None = Field(None, max_length=MAX_STOP)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: _int(ge=0) = 0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    prompt_logprobs: _int(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="vLLM's extension: top-n logprobs of each prompt token (not with stream)")
    return_tokens_as_token_ids: bool = Field(
        False, description="vLLM's extension: logprob tokens as 'token_id:N' instead of text")
    user: str | None = None
    cache_salt: str | None = Field(
        None, min_length=1, description="vLLM's extension: requests share cached prompt pages only with "
                                        "requests of the same salt (e.g. one per tenant)")
    # Structured output: at most one of these (server/structured.py maps them for the engine).
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = Field(None, description="vLLM's extension: a JSON schema")
    guided_regex: str | None = Field(None, description="vLLM's extension: a regular expression")
    guided_choice: list[str] | None = Field(None, description="vLLM's extension: one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM's extension: a context-free grammar")
    structured_outputs: StructuredOutputsRequest | None = None

    @model_validator(mode="after")
    def _check_common(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        for i, s in enumerate(stops):
            if not s:
                raise ValueError(f"stop[{i}]: stop sequences must be non-empty strings")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop[{i}]: a stop sequence is limited to {MAX_STOP_CHARS} characters")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs: not available when stream is true")
        return self


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        ..., description="a string, a list of strings, a list of token ids, or a list of lists of token ids")
    max_tokens: _int(ge=0) | None = Field(
        16, description="null: up to the model's context length; 0 with echo scores the prompt only")
    logprobs: _int(ge=0, le=MAX_LOGPROBS) | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: _int(ge=1, le=MAX_N) | None = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.suffix:
            raise ValueError("suffix: is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of equal to n is supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo true (to score the prompt)")
        return self


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str

    @model_validator(mode="after")
    def _check_arguments(self):
        try:
            json.loads(self.arguments)
        except json.JSONDecodeError:
            raise ValueError("arguments: must be the call's arguments as JSON text") from None
        return self


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


Content = Union[str, list[TextPart]]


class _Message(StrictModel):
    name: str | None = None

    def text(self) -> str | None:
        """The content as one string; text parts join with newlines, as vLLM joins them."""
        content = getattr(self, "content", None)
        if isinstance(content, list):
            return "\n".join(part.text for part in content)
        return content

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (OpenAI's field names, content as one string)."""
        out = self.model_dump(exclude_none=True, exclude={"content"})
        out["content"] = self.text()
        return out


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None

    def as_template_dict(self) -> dict[str, Any]:
        """Tool calls' arguments become objects, as tool-use templates read them (`arguments |
        tojson`, `arguments.items()`); a message with only tool calls has empty text content."""
        out = super().as_template_dict()
        if out["content"] is None:
            out["content"] = ""
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        return out

    @model_validator(mode="after")
    def _check_content(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("content: an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


ROLES = ("system", "developer", "user", "assistant", "tool")
ChatMessage = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


class FunctionDefinition(StrictModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_tokens: _int(ge=1) | None = Field(None, description="deprecated by OpenAI; max_completion_tokens wins")
    max_completion_tokens: _int(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: _int(ge=0, le=MAX_LOGPROBS) | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="'auto' when tools are given, else 'none'")
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: needs tools to choose from")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice: the function {name!r} is not among the request's tools")
        return self

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
