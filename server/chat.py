"""POST /v1/chat/completions: the model's chat template renders the conversation into one prompt;
tool calls are read back out of the text (server/tools.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from typing import Any, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.server.errors import bad_request
from jaxinfer.server.protocol import ChatCompletionRequest
from jaxinfer.server.serving import Serving, StreamedChoices, new_id, salt_of, usage
from jaxinfer.server.streaming import EventStreamResponse, unless_disconnected
from jaxinfer.server.structured import structured_outputs
from jaxinfer.server.tool_parsers import ToolCallStream, tool_calls_field
from jaxinfer.server.tools import ToolPlan, plan_tools

router = APIRouter()

# Template variables a request may not set through chat_template_kwargs.
_RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt"})


def _template_handles_tools(tok) -> bool:
    templates = getattr(tok, "chat_templates", {})
    return "tool_use" in templates or re.search(r"\btools\b", tok.chat_template or "") is not None


def render_messages(serving: Serving, messages: Sequence[dict[str, Any]], *, tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None = None,
                    param: str = "messages") -> tuple[str, list[int]]:
    """The prompt text and token ids of a conversation (template dicts), as the model's chat
    template writes it; a 400 naming `param` when the template cannot render it."""
    tok = serving.info.tokenizer
    if tok is None or not tok.chat_template:
        raise bad_request("this model has no chat template; use /v1/completions with a plain prompt", param)
    if tools and not _template_handles_tools(tok):
        raise bad_request("tools: this model's chat template does not support tools", "tools")
    kwargs = dict(template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_VARIABLES & kwargs.keys())
    if reserved:
        raise bad_request(f"chat_template_kwargs: {', '.join(reserved)} cannot be set here", "chat_template_kwargs")
    try:
        text = tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tools=tools,
                                       **kwargs)
    except Exception as e:  # the template is fixed, so whatever breaks it came with the request
        raise bad_request(f"the chat template could not render these messages: {e}", param) from None
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("the chat template rendered these messages as an empty prompt", param)
    return text, ids


def render_chat(serving: Serving, body: ChatCompletionRequest, plan: ToolPlan | None = None) -> tuple[str, list[int]]:
    """The prompt of a chat request (with the tools its plan puts in the prompt)."""
    return render_messages(serving, [m.as_template_dict() for m in body.messages],
                           tools=plan.template_tools if plan else None,
                           add_generation_prompt=body.add_generation_prompt,
                           template_kwargs=body.chat_template_kwargs)


@dataclasses.dataclass(frozen=True)
class PreparedChat:
    """A chat request made ready for the engine, with what its answer needs.

    Attributes:
      plan: how the request uses its tools.
      prompt: the engine prompt (the rendered conversation and its token ids).
      params: the request's SamplingParams.
    """

    plan: ToolPlan
    prompt: dict[str, Any]
    params: SamplingParams


def prepare_chat(serving: Serving, body: ChatCompletionRequest) -> PreparedChat:
    """The engine request of a /v1/chat/completions body; a 400 (OpenAIError) for what cannot be
    served. Pure host work (the chat template, tokenization), shared by the HTTP route and
    `jaxinfer batch`."""
    plan = plan_tools(body, serving.tool_call_parser)
    constraint = structured_outputs(body, plan.constraint)
    text, ids = render_chat(serving, body, plan)
    max_tokens = serving.completion_budget(len(ids), body.completion_limit, "messages")
    params = serving.sampling_params(body, max_tokens=max_tokens,
                                     logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                     stream=body.stream, prompt_logprobs=body.prompt_logprobs,
                                     structured_outputs=constraint,
                                     keep_special_tokens=plan.parser is not None and plan.parser.keep_special_tokens)
    return PreparedChat(plan, {"prompt": text, "prompt_token_ids": ids, **salt_of(body)}, params)


def chat_body(serving: Serving, body: ChatCompletionRequest, prepared: PreparedChat, out: RequestOutput, *,
              request_id: str, model: str) -> dict[str, Any]:
    """The (unstreamed) chat.completion object, from the request's final engine output."""
    fmt = serving.logprobs(body.return_tokens_as_token_ids)
    choices = []
    for c in out.outputs:
        message, finish_reason = _message(c.text, c.finish_reason, prepared.plan)
        choices.append({"index": c.index, "message": message,
                        "logprobs": fmt.chat_logprobs(c, body.top_logprobs or 0) if body.logprobs else None,
                        "finish_reason": finish_reason, "stop_reason": serving.stop_reason(c, prepared.params)})
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(len(prepared.prompt["prompt_token_ids"]), completion_tokens),
            "system_fingerprint": None, "prompt_logprobs": fmt.prompt_logprobs(out, body.prompt_logprobs or 0)}


@router.post("/v1/chat/completions", tags=["OpenAI"])
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    serving: Serving = request.app.state.serving
    model = serving.resolve_model(body.model)
    prepared = await asyncio.to_thread(prepare_chat, serving, body)
    request_id = new_id("chatcmpl")
    opened = await unless_disconnected(
        request, serving.open_streams([(prepared.prompt, prepared.params)], request_id), request_id)
    if not body.stream:
        [(out, _)] = opened
        return JSONResponse(chat_body(serving, body, prepared, out, request_id=request_id, model=model))
    header = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    return EventStreamResponse(_stream(serving, body, header, opened, prepared.params, prepared.plan),
                               on_disconnect=lambda: serving.note_disconnect(f"{request_id} mid-stream"))


def _message(text: str, finish_reason: str | None, plan: ToolPlan) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished choice and its finish reason ("tool_calls" when the
    text held tool calls)."""
    message = {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": []}
    if plan.parser is None:
        return message, finish_reason
    content, calls = plan.parser.extract(text)
    if not calls:
        return message, finish_reason
    calls = calls[:plan.max_calls] if plan.max_calls is not None else calls
    return {**message, "content": content, "tool_calls": tool_calls_field(plan.parser, calls)}, "tool_calls"


def _stream(serving: Serving, body: ChatCompletionRequest, header: dict[str, Any], opened, params, plan: ToolPlan):
    choices = StreamedChoices(opened, body.n, body.stream_options, body.logprobs)
    top_n = body.top_logprobs or 0
    fmt = serving.logprobs(body.return_tokens_as_token_ids)
    # The first chunk of each choice names the role, as OpenAI's stream does.
    roles = [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
             for index in range(body.n)]
    calls = {index: ToolCallStream(plan.parser, plan.max_calls) for index in range(body.n)} if plan.parser else {}

    def choice_of(i: int, index: int, c) -> list[dict[str, Any]]:
        logprobs = fmt.chat_logprobs(c, top_n) if body.logprobs else None
        finish_reason, stop_reason = c.finish_reason, serving.stop_reason(c, params)
        if index not in calls:
            deltas = [{"content": c.text}]
        else:
            deltas = calls[index].feed(c.text, final=finish_reason is not None)
            if finish_reason is not None and calls[index].called:
                finish_reason = "tool_calls"
            if not deltas and (finish_reason is not None or logprobs is not None):
                deltas = [{}]  # the finish reason (or the tokens' logprobs) still has to go out
        out = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        if out:
            out[0]["logprobs"] = logprobs
            out[-1].update(finish_reason=finish_reason, stop_reason=stop_reason)
        return out

    return choices.events(header, choice_of, roles)
