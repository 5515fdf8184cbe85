"""Request bodies of the OpenAI API (with vLLM's sampling extras), as pydantic models.

Field names, defaults and ranges follow OpenAI's API reference; where vLLM accepts more (top_k,
min_p, repetition_penalty, ...) so do we, under vLLM's names. Types are strict: a string where a
number belongs is a 400, not a silent conversion. Unknown fields are ignored, as vLLM does, so
newer clients that send fields this server does not know still work.

Responses are built as plain dicts in the route modules: their shape is fixed by the API and
checked by the tests with the official client.
"""

from __future__ import annotations

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
    max_tokens: _int(ge=1) | None = Field(16, description="null: up to the model's context length")
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
        return self


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str


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


class ResponseFormat(StrictModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    type: Literal["text", "json_object", "json_schema"]


class FunctionDefinition(StrictModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_tokens: _int(ge=1) | None = Field(None, description="deprecated by OpenAI; max_completion_tokens wins")
    max_completion_tokens: _int(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: _int(ge=0, le=MAX_LOGPROBS) | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(f"response_format: type {self.response_format.type!r} is not supported yet "
                             "(structured output is not implemented); use type 'text'")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice: only 'none' and 'auto' are supported (forced tool calls need "
                             "structured output, which is not implemented yet)")
        return self

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
