"""POST /v1/completions: text or token-id prompts, one engine request per prompt, n choices each."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.server.errors import bad_request
from jaxinfer.server.logprobs import LogprobFormatter
from jaxinfer.server.protocol import MAX_PROMPTS, CompletionRequest
from jaxinfer.server.serving import Serving, StreamedChoices, new_id, salt_of, usage
from jaxinfer.server.streaming import SSE_DONE, EventStreamResponse, sse, unless_disconnected
from jaxinfer.server.structured import structured_outputs

router = APIRouter()


def _prompt_list(prompt) -> tuple[list[str | list[int]], str]:
    """The request's prompts as a list (strings or token-id lists) and how to name them in errors."""
    if isinstance(prompt, str):
        return [prompt], "prompt"
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt], "prompt"
    return list(prompt), "prompt"


def prepare_prompts(serving: Serving, body: CompletionRequest) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) per prompt, checked against the vocabulary and the context."""
    prompts, param = _prompt_list(body.prompt)
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"prompt: at most {MAX_PROMPTS} prompts are allowed in one request, got {len(prompts)}",
                          param)
    tok = serving.info.tokenizer
    out = []
    for i, p in enumerate(prompts):
        where = param if len(prompts) == 1 else f"{param}[{i}]"
        if isinstance(p, str):
            if tok is None:
                raise bad_request("this model has no tokenizer: send the prompt as token ids", param)
            ids = tok.encode(p) if p else []
            text = p
        else:
            serving.check_token_ids(p, where)
            ids, text = list(p), None
        if not ids:
            raise bad_request(f"{where} must not be empty", param)
        out.append((text, ids))
    return out


@dataclasses.dataclass(frozen=True)
class PreparedCompletion:
    """A completion request made ready for the engine, with what its answer needs.

    Attributes:
      prompts: (text or None, token ids) per prompt.
      requests: (engine prompt, SamplingParams) per prompt.
      echoes: the text each prompt's choices start with ("" unless echo is set).
      score_only: echo with max_tokens 0: the answer scores the prompt and leaves out the one
        token the engine generates (it cannot generate none).
    """

    prompts: list[tuple[str | None, list[int]]]
    requests: list[tuple[dict[str, Any], SamplingParams]]
    echoes: list[str]
    score_only: bool


def prepare_completion(serving: Serving, body: CompletionRequest) -> PreparedCompletion:
    """The engine requests of a /v1/completions body; a 400 (OpenAIError) for what cannot be served.

    Pure host work (tokenization included), shared by the HTTP route and `jaxinfer batch`."""
    constraint = structured_outputs(body)
    prompts = prepare_prompts(serving, body)
    # Echoed prompts get logprobs too, as vLLM gives them: the prompt's, then the completion's.
    prompt_logprobs = body.prompt_logprobs
    if body.echo and body.logprobs is not None:
        prompt_logprobs = max(body.logprobs, prompt_logprobs or 0)
    score_only = body.echo and body.max_tokens == 0
    requests = []
    for text, ids in prompts:
        max_tokens = serving.completion_budget(len(ids), 1 if score_only else body.max_tokens, "prompt")
        params = serving.sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs,
                                         stream=body.stream and not score_only, prompt_logprobs=prompt_logprobs,
                                         structured_outputs=constraint)
        requests.append(({"prompt": text, "prompt_token_ids": ids, **salt_of(body)}, params))
    echoes = [_echo_text(serving, text, ids, body) if body.echo else "" for text, ids in prompts]
    return PreparedCompletion(prompts, requests, echoes, score_only)


def completion_body(serving: Serving, body: CompletionRequest, prepared: PreparedCompletion,
                    outputs: Sequence[RequestOutput], *, request_id: str, model: str) -> dict[str, Any]:
    """The (unstreamed) text_completion object, from each prompt's final engine output."""
    fmt = serving.logprobs(body.return_tokens_as_token_ids)
    if prepared.score_only:
        choices, completion_tokens = _scored_choices(fmt, body, outputs, prepared.echoes), 0
    else:
        choices, completion_tokens = [], 0
        for i, out in enumerate(outputs):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _logprobs(fmt, out, c, body.echo, 0)[0]
                choices.append({"index": i * body.n + c.index, "text": prepared.echoes[i] + c.text,
                                "logprobs": logprobs, "finish_reason": c.finish_reason,
                                "stop_reason": serving.stop_reason(c, prepared.requests[i][1]),
                                "prompt_logprobs": fmt.prompt_logprobs(out, body.prompt_logprobs or 0)
                                if body.prompt_logprobs is not None else None})
    prompt_tokens = sum(len(ids) for _, ids in prepared.prompts)
    return {**_header(request_id, model), "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
            "system_fingerprint": None}


def _header(request_id: str, model: str) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model}


@router.post("/v1/completions", tags=["OpenAI"])
async def create_completion(body: CompletionRequest, request: Request):
    serving: Serving = request.app.state.serving
    model = serving.resolve_model(body.model)
    prepared = await asyncio.to_thread(prepare_completion, serving, body)
    request_id = new_id("cmpl")
    opened = await unless_disconnected(request, serving.open_streams(prepared.requests, request_id), request_id)
    if not body.stream:
        return JSONResponse(completion_body(serving, body, prepared, [out for out, _ in opened],
                                            request_id=request_id, model=model))
    header = _header(request_id, model)
    if prepared.score_only:
        return EventStreamResponse(_iterate(_scored_events(serving, body, header, opened, prepared.echoes)))
    return EventStreamResponse(_stream(serving, body, header, opened, prepared.echoes,
                                       [p for _, p in prepared.requests]),
                               on_disconnect=lambda: serving.note_disconnect(f"{request_id} mid-stream"))


def _scored_choices(fmt: LogprobFormatter, body: CompletionRequest, outputs: Sequence[RequestOutput],
                    echoes: list[str]) -> list[dict[str, Any]]:
    """The choices of echo with max_tokens 0: each prompt as its choice's text (with its logprobs
    when asked), no completion tokens."""
    choices = []
    for i, out in enumerate(outputs):
        logprobs = None
        if body.logprobs is not None:
            logprobs = fmt.completion_logprobs(out.prompt_token_ids, out.prompt_logprobs or [], 0)[0]
        for j in range(body.n):
            choices.append({"index": i * body.n + j, "text": echoes[i], "logprobs": logprobs,
                            "finish_reason": "length", "stop_reason": None,
                            "prompt_logprobs": fmt.prompt_logprobs(out, body.prompt_logprobs or 0)
                            if body.prompt_logprobs is not None else None})
    return choices


def _scored_events(serving: Serving, body: CompletionRequest, header: dict[str, Any], opened,
                   echoes: list[str]) -> list[str]:
    """The streamed answer to echo with max_tokens 0: one chunk per choice."""
    outputs = [out for out, _ in opened]
    choices = _scored_choices(serving.logprobs(body.return_tokens_as_token_ids), body, outputs, echoes)
    prompt_tokens = sum(len(out.prompt_token_ids) for out in outputs)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    extra = {"usage": None} if include_usage else {}
    events = [sse({**header, "choices": [c], **extra}) for c in choices]
    if include_usage:
        events.append(sse({**header, "choices": [], "usage": usage(prompt_tokens, 0)}))
    return [*events, SSE_DONE]


async def _iterate(items):
    for item in items:
        yield item


def _logprobs(fmt: LogprobFormatter, out, c, with_prompt: bool, offset: int) -> tuple[dict[str, Any], int]:
    """The choice's logprobs object, led by the prompt's tokens when the prompt is echoed with it."""
    parts = []
    if with_prompt:
        part, offset = fmt.completion_logprobs(out.prompt_token_ids, out.prompt_logprobs or [], offset)
        parts.append(part)
    part, offset = fmt.completion_logprobs(c.token_ids, c.logprobs or [], offset)
    parts.append(part)
    return {key: [v for p in parts for v in p[key]] for key in part}, offset


def _echo_text(serving: Serving, text: str | None, ids: list[int], body: CompletionRequest) -> str:
    if text is not None:
        return text
    tok = serving.info.tokenizer
    return tok.decode(ids, skip_special_tokens=body.skip_special_tokens) if tok is not None else ""


def _stream(serving: Serving, body: CompletionRequest, header: dict[str, Any], opened, echoes, params):
    choices = StreamedChoices(opened, body.n, body.stream_options, body.logprobs is not None)
    # The echoed prompt goes out with each choice's first chunk.
    pending_echo = {i * body.n + j: echoes[i] for i in range(len(opened)) for j in range(body.n)}
    offsets = dict.fromkeys(pending_echo, 0)
    fmt = serving.logprobs(body.return_tokens_as_token_ids)

    def choice_of(i: int, index: int, c) -> dict[str, Any]:
        echo = pending_echo.pop(index, None)
        logprobs = None
        if body.logprobs is not None:
            first_output = opened[i][0]
            logprobs, offsets[index] = _logprobs(fmt, first_output, c, body.echo and echo is not None,
                                                 offsets[index])
        return {"index": index, "text": (echo or "") + c.text, "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": serving.stop_reason(c, params[i])}

    return choices.events(header, choice_of)
