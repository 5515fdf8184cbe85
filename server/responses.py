"""POST /v1/responses (OpenAI's Responses API, text in and out) and GET /v1/responses/{id}.

Generation is the chat endpoint's: `instructions` and the input items become chat messages for
the model's template, and `tools` / `tool_choice` are planned as there (server/tools.py): calls
read out of the text come back as `function_call` output items, and `function_call_output`
input items give their results to the next turn. A stored response (the default, `store`) keeps its conversation, so a
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
from jaxinfer.server.streaming import EventStreamResponse, compact_json, prepend, unless_disconnected
from jaxinfer.server.structured import structured_outputs
from jaxinfer.server.tools import ToolPlan, plan_tools

router = APIRouter()


def _not_found(response_id: str, param: str | None) -> OpenAIError:
    return OpenAIError(404, f"Response with id '{response_id}' not found.", param=param,
                       code="previous_response_not_found" if param else "response_not_found")


def _constraint(body: ResponsesRequest, forced=None):
    """The request's structured output: `text.format` (the Responses API's way), or vLLM's
    fields; `forced`: the constraint of a required or named tool choice."""
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type != "text":
        if body.response_format is not None:
            raise bad_request("only one structured output constraint can be set per request, got text.format, "
                              "response_format", "response_format")
        schema = JsonSchemaFormat(name=fmt.name or "response", schema=fmt.schema_) if fmt.type == "json_schema" else None
        body = body.model_copy(update={"response_format": ResponseFormat(type=fmt.type, json_schema=schema)})
    return structured_outputs(body, forced)


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

    @staticmethod
    def function_call(call: dict[str, str]) -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": f"call_{uuid.uuid4().hex[:24]}",
                "name": call["name"], "arguments": call["arguments"], "status": "completed"}

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
                "parallel_tool_calls": b.parallel_tool_calls, "tool_choice": _tool_choice(b),
                "tools": [t.model_dump(exclude_none=True) for t in b.tools or ()], "store": b.store,
                "metadata": b.metadata or {}, "text": {"format": fmt}, "truncation": "disabled", "user": b.user}


def _tool_choice(body: ResponsesRequest):
    choice = body.tool_choice or ("auto" if body.tools else "none")
    return choice if isinstance(choice, str) else choice.model_dump()


def _output_items(response: "_Response", text: str, status: str, plan: ToolPlan) -> tuple[list[dict], dict]:
    """The output items of a finished text (a message, then any function calls read out of it)
    and the assistant turn it adds to the conversation."""
    content, calls = (text, []) if plan.parser is None else plan.parser.extract(text)
    calls = calls[:plan.max_calls] if plan.max_calls is not None else calls
    items = [response.message(content, status)] if content or not calls else []
    items += [response.function_call(call) for call in calls]
    turn = {"role": "assistant", "content": content or ""}
    if calls:
        turn["tool_calls"] = [{"id": item["call_id"], "type": "function", "function": {
            "name": item["name"], "arguments": json.loads(item["arguments"])}} for item in items
            if item["type"] == "function_call"]
    return items, turn


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
    plan = plan_tools(body.chat_tools(), serving.tool_call_parser)
    constraint = _constraint(body, plan.constraint)
    text, ids = await asyncio.to_thread(render_messages, serving, system + conversation, tools=plan.template_tools,
                                        param="input")
    max_tokens = serving.completion_budget(len(ids), body.max_output_tokens, "input")
    params = serving.sampling_params(body, max_tokens=max_tokens, logprobs=None, stream=body.stream,
                                     structured_outputs=constraint,
                                     keep_special_tokens=plan.parser is not None and plan.parser.keep_special_tokens)
    response = _Response(body, model, max_tokens)
    [(first, rest)] = await unless_disconnected(
        request, serving.open_streams([({"prompt": text, "prompt_token_ids": ids}, params)], response.id),
        response.id)

    def finish(output_text: str, output_tokens: int, finish_reason: str | None) -> dict[str, Any]:
        incomplete = finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        items, turn = _output_items(response, output_text, status, plan)
        obj = response.object(status, items, _usage(len(ids), output_tokens), incomplete)
        if body.store:
            store.put(response.id, conversation + [turn], obj)
        return obj

    if body.stream:
        # Text with possible tool calls is read whole before any item goes out.
        events = _events(response, prepend(first, rest), finish, buffered=plan.parser is not None)
        return EventStreamResponse(events,
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
    data = compact_json({"type": kind, "sequence_number": sequence, **fields})
    return f"event: {kind}\ndata: {data}\n\n"


async def _events(response: _Response, outputs: AsyncIterator, finish, buffered: bool = False
                  ) -> AsyncIterator[str]:
    """The Responses API's event sequence: created, in_progress, the message item and its text
    part opened, text deltas, then everything closed and response.completed (or .incomplete).

    buffered: the text may hold tool calls, which cannot be told from text before its end, so
    the items (message and function calls) go out once the text is complete (`_item_events`)."""
    seq = iter(range(1 << 62))
    item = {"item_id": response.message_id, "output_index": 0, "content_index": 0}
    yield _event("response.created", next(seq), response=response.object("in_progress", []))
    yield _event("response.in_progress", next(seq), response=response.object("in_progress", []))
    if not buffered:
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
                    if not buffered:
                        yield _event("response.output_text.delta", next(seq), **item, delta=c.text, logprobs=[])
    except Exception as e:  # the status line already went out as 200
        error = json.loads(stream_error_event(e)[len("data: "):])["error"]
        yield _event("error", next(seq), code=error["code"] or error["type"], message=error["message"],
                     param=error["param"])
        return
    obj = finish(text, tokens, finish_reason)
    if buffered:
        for event in _item_events(obj, seq):
            yield event
    else:
        [message] = obj["output"]
        yield _event("response.output_text.done", next(seq), **item, text=text, logprobs=[])
        yield _event("response.content_part.done", next(seq), **item, part=response.part(text))
        yield _event("response.output_item.done", next(seq), output_index=0, item=message)
    yield _event("response." + ("incomplete" if obj["status"] == "incomplete" else "completed"), next(seq),
                 response=obj)


def _item_events(obj: dict[str, Any], seq) -> list[str]:
    """Every output item of a finished response, each opened, filled and closed."""
    out = []
    for index, item in enumerate(obj["output"]):
        if item["type"] == "message":
            text = item["content"][0]["text"] if item["content"] else ""
            at = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(_event("response.output_item.added", next(seq), output_index=index,
                              item={**item, "status": "in_progress", "content": []}))
            out.append(_event("response.content_part.added", next(seq), **at, part=_Response.part("")))
            if text:
                out.append(_event("response.output_text.delta", next(seq), **at, delta=text, logprobs=[]))
            out.append(_event("response.output_text.done", next(seq), **at, text=text, logprobs=[]))
            out.append(_event("response.content_part.done", next(seq), **at, part=_Response.part(text)))
        else:
            at = {"item_id": item["id"], "output_index": index}
            out.append(_event("response.output_item.added", next(seq), output_index=index,
                              item={**item, "status": "in_progress", "arguments": ""}))
            out.append(_event("response.function_call_arguments.delta", next(seq), **at, delta=item["arguments"]))
            out.append(_event("response.function_call_arguments.done", next(seq), **at,
                              arguments=item["arguments"]))
        out.append(_event("response.output_item.done", next(seq), output_index=index, item=item))
    return out
