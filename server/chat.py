"""POST /v1/chat/completions: the model's chat template renders the conversation into one prompt."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.errors import bad_request
from server.protocol import ChatCompletionRequest
from server.serving import Serving, StreamedChoices, new_id, usage
from server.streaming import EventStreamResponse, unless_disconnected

router = APIRouter()

# Template variables a request may not set through chat_template_kwargs.
_RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt"})


def _template_handles_tools(tok) -> bool:
    templates = getattr(tok, "chat_templates", {})
    return "tool_use" in templates or re.search(r"\btools\b", tok.chat_template or "") is not None


def render_chat(serving: Serving, body: ChatCompletionRequest) -> tuple[str, list[int]]:
    """The prompt text and token ids of the conversation, as the model's chat template writes it."""
    tok = serving.info.tokenizer
    if tok is None or not tok.chat_template:
        raise bad_request("this model has no chat template; use /v1/completions with a plain prompt", "messages")
    tools = None
    if body.tools:
        if not _template_handles_tools(tok):
            raise bad_request("tools: this model's chat template does not support tools", "tools")
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
    kwargs = dict(body.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_VARIABLES & kwargs.keys())
    if reserved:
        raise bad_request(f"chat_template_kwargs: {', '.join(reserved)} cannot be set here", "chat_template_kwargs")
    messages = [m.as_template_dict() for m in body.messages]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt, tools=tools,
                                       **kwargs)
    except Exception as e:  # the template is fixed, so whatever breaks it came with the request
        raise bad_request(f"the chat template could not render these messages: {e}", "messages") from None
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("the chat template rendered these messages as an empty prompt", "messages")
    return text, ids


@router.post("/v1/chat/completions", tags=["OpenAI"])
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    serving: Serving = request.app.state.serving
    model = serving.resolve_model(body.model)
    text, ids = await asyncio.to_thread(render_chat, serving, body)
    max_tokens = serving.completion_budget(len(ids), body.completion_limit, "messages")
    top_n = body.top_logprobs or 0
    params = serving.sampling_params(body, max_tokens=max_tokens, logprobs=top_n if body.logprobs else None,
                                     stream=body.stream, prompt_logprobs=body.prompt_logprobs)
    request_id = new_id("chatcmpl")
    opened = await unless_disconnected(
        request, serving.open_streams([({"prompt": text, "prompt_token_ids": ids}, params)], request_id))
    header = {"id": request_id, "object": "chat.completion.chunk" if body.stream else "chat.completion",
              "created": int(time.time()), "model": model}
    if body.stream:
        return EventStreamResponse(_stream(serving, body, header, opened, params))
    [(out, _)] = opened
    fmt = serving.logprobs(body.return_tokens_as_token_ids)
    choices = []
    for c in out.outputs:
        choices.append({"index": c.index, "message": _message(c.text),
                        "logprobs": fmt.chat_logprobs(c, top_n) if body.logprobs else None,
                        "finish_reason": c.finish_reason, "stop_reason": serving.stop_reason(c, params)})
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return JSONResponse({**header, "choices": choices, "usage": usage(len(ids), completion_tokens),
                         "system_fingerprint": None,
                         "prompt_logprobs": fmt.prompt_logprobs(out, body.prompt_logprobs or 0)})


def _message(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "reasoning_content": None, "tool_calls": []}


def _stream(serving: Serving, body: ChatCompletionRequest, header: dict[str, Any], opened, params):
    choices = StreamedChoices(opened, body.n, body.stream_options, body.logprobs)
    top_n = body.top_logprobs or 0
    fmt = serving.logprobs(body.return_tokens_as_token_ids)
    # The first chunk of each choice names the role, as OpenAI's stream does.
    roles = [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
             for index in range(body.n)]

    def choice_of(i: int, index: int, c) -> dict[str, Any]:
        return {"index": index, "delta": {"content": c.text},
                "logprobs": fmt.chat_logprobs(c, top_n) if body.logprobs else None,
                "finish_reason": c.finish_reason, "stop_reason": serving.stop_reason(c, params)}

    return choices.events(header, choice_of, roles)
