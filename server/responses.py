"""POST /v1/responses (OpenAI's Responses API, text in and out) and GET /v1/responses/{id}.

Generation is the chat endpoint's: `instructions` and the input items become chat messages for
the model's template. A stored response (the default, `store`) keeps its conversation, so a
request naming it in `previous_response_id` continues from it; the store is bounded and in
memory, so ids are forgotten on restart or once enough newer responses came.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from jaxinfer.server.chat import render_messages
from jaxinfer.server.errors import OpenAIError, bad_request
from jaxinfer.server.protocol import JsonSchemaFormat, ResponseFormat
from jaxinfer.server.responses_protocol import ResponsesRequest, ResponseStore
from jaxinfer.server.serving import Serving, stream_error_event
from jaxinfer.server.streaming import EventStreamResponse, prepend, unless_disconnected
from jaxinfer.server.structured import structured_outputs

router = APIRouter()


def _not_found(response_id: str, param: str | None) -> OpenAIError:
    return OpenAIError(404, f"Response with id '{response_id}' not found.", param=param,
                       code="previous_response_not_found" if param else "response_not_found")


def _constraint(body: ResponsesRequest):
    """The request's structured output: `text.format` (the Responses API's way), or vLLM's fields."""
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type != "text":
        if body.response_format is not None:
            raise bad_request("only one structured output constraint can be set per request, got text.format, "
                              "response_format", "response_format")
        schema = JsonSchemaFormat(name=fmt.name or "response", schema=fmt.schema_) if fmt.type == "json_schema" else None
        body = body.model_copy(update={"response_format": ResponseFormat(type=fmt.type, json_schema=schema)})
    return structured_outputs(body)


def _usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


class _Response:
    """One response's fixed fields and how its object reads at each stage."""

    def __init__(self, body: ResponsesRequest, model: str, max_tokens: int):
        self.body = body
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.max_tokens = max_tokens

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [] if text is None else [self.part(text)]}

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def object(self, status: str, output: list[dict], usage: dict | None = None,
               incomplete: bool = False) -> dict[str, Any]:
        b = self.body
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else {"type": "text"}
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "model": self.model, "output": output, "usage": usage, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
                "temperature": 1.0 if b.temperature is None else b.temperature,
                "top_p": 1.0 if b.top_p is None else b.top_p, "previous_response_id": b.previous_response_id,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "store": b.store,
                "metadata": b.metadata or {}, "text": {"format": fmt}, "truncation": "disabled", "user": b.user}


@router.post("/v1/responses", tags=["OpenAI"])
async def create_response(body: ResponsesRequest, request: Request):
    serving: Serving = request.app.state.serving
    store: ResponseStore = request.app.state.responses
    model = serving.resolve_model(body.model)
    history: list[dict] = []
    if body.previous_response_id is not None:
        stored = store.get(body.previous_response_id)
        if stored is None:
            raise _not_found(body.previous_response_id, "previous_response_id")
        history = stored[0]
    conversation = history + body.input_messages()
    system = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    constraint = _constraint(body)
    text, ids = await asyncio.to_thread(render_messages, serving, system + conversation, param="input")
    max_tokens = serving.completion_budget(len(ids), body.max_output_tokens, "input")
    params = serving.sampling_params(body, max_tokens=max_tokens, logprobs=None, stream=body.stream,
                                     structured_outputs=constraint)
    response = _Response(body, model, max_tokens)
    [(first, rest)] = await unless_disconnected(
        request, serving.open_streams([({"prompt": text, "prompt_token_ids": ids}, params)], response.id),
        response.id)

    def finish(output_text: str, output_tokens: int, finish_reason: str | None) -> dict[str, Any]:
        incomplete = finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        obj = response.object(status, [response.message(output_text, status)], _usage(len(ids), output_tokens),
                              incomplete)
        if body.store:
            store.put(response.id, conversation + [{"role": "assistant", "content": output_text}], obj)
        return obj

    if body.stream:
        return EventStreamResponse(_events(response, prepend(first, rest), finish),
                                   on_disconnect=lambda: serving.note_disconnect(f"{response.id} mid-stream"))
    [c] = first.outputs
    return JSONResponse(finish(c.text, len(c.token_ids), c.finish_reason))


@router.get("/v1/responses/{response_id}", tags=["OpenAI"])
async def retrieve_response(response_id: str, request: Request):
    stored = request.app.state.responses.get(response_id)
    if stored is None:
        raise _not_found(response_id, None)
    return JSONResponse(stored[1])


def _event(kind: str, sequence: int, **fields) -> str:
    data = json.dumps({"type": kind, "sequence_number": sequence, **fields}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n"


async def _events(response: _Response, outputs: AsyncIterator, finish) -> AsyncIterator[str]:
    """The Responses API's event sequence: created, in_progress, the message item and its text
    part opened, text deltas, then everything closed and response.completed (or .incomplete)."""
    seq = iter(range(1 << 62))
    item = {"item_id": response.message_id, "output_index": 0, "content_index": 0}
    yield _event("response.created", next(seq), response=response.object("in_progress", []))
    yield _event("response.in_progress", next(seq), response=response.object("in_progress", []))
    yield _event("response.output_item.added", next(seq), output_index=0,
                 item=response.message(None, "in_progress"))
    yield _event("response.content_part.added", next(seq), **item, part=response.part(""))
    text, tokens, finish_reason = "", 0, None
    try:
        async with contextlib.aclosing(outputs) as stream:
            async for out in stream:
                [c] = out.outputs
                tokens += len(c.token_ids)
                finish_reason = c.finish_reason or finish_reason
                if c.text:
                    text += c.text
                    yield _event("response.output_text.delta", next(seq), **item, delta=c.text, logprobs=[])
    except Exception as e:  # the status line already went out as 200
        error = json.loads(stream_error_event(e)[len("data: "):])["error"]
        yield _event("error", next(seq), code=error["code"] or error["type"], message=error["message"],
                     param=error["param"])
        return
    obj = finish(text, tokens, finish_reason)
    [message] = obj["output"]
    yield _event("response.output_text.done", next(seq), **item, text=text, logprobs=[])
    yield _event("response.content_part.done", next(seq), **item, part=response.part(text))
    yield _event("response.output_item.done", next(seq), output_index=0, item=message)
    yield _event("response." + ("incomplete" if obj["status"] == "incomplete" else "completed"), next(seq),
                 response=obj)

