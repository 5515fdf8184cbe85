"""What both generation endpoints share: the model's facts, admission checks, sampling parameters,
opening engine streams with errors mapped to HTTP statuses, and streamed choices with usage."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

from jaxinfer.engine.async_engine import EngineDeadError, QueueFullError
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from jaxinfer.server.errors import OpenAIError, bad_request, error_body, overloaded, param_of_message
from jaxinfer.server.logprobs import LogprobFormatter
from jaxinfer.server.protocol import SamplingFields
from jaxinfer.server.streaming import SSE_DONE, compact_json, merge, prepend, sse

logger = logging.getLogger(__name__)

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the routes need to know about the served model."""

    served_names: tuple[str, ...]
    tokenizer: Any  # jaxinfer.tokenizer.Tokenizer or None
    max_model_len: int
    vocab_size: int
    root: str
    created: int

    @classmethod
    def from_engine(cls, engine, served_names: Sequence[str]) -> "ModelInfo":
        """Reads the facts off an LLMEngine (or anything with the same attributes)."""
        if not served_names:
            raise ValueError("at least one served model name is needed")
        return cls(tuple(served_names), engine.tokenizer, int(engine.max_model_len),
                   int(engine.model_config.vocab_size), str(getattr(engine.model, "path", served_names[0])), int(time.time()))


class Serving:
    """The engine front plus the served model's facts; one per app.

    Args:
      front: an AsyncLLMEngine (or a fake with `generate` and `call`).
      info: the served model.
    """

    def __init__(self, front, info: ModelInfo, tool_call_parser: str | None = None):
        self.front = front
        self.info = info
        self.tool_call_parser = tool_call_parser  # None: auto tool choice is off
        self.disconnects = 0  # requests whose client went away before the answer was complete

    def note_disconnect(self, what: str) -> None:
        """Counts and logs (once, at INFO) a client that went away; its engine requests are
        aborted by whoever closes their streams."""
        self.disconnects += 1
        logger.info("client disconnected: %s; its request was aborted", what)

    # -- checks ------------------------------------------------------------------------------
    def resolve_model(self, name: str | None) -> str:
        """The model name to answer with; 404 if the request names a model not served here."""
        if name is None:
            return self.info.served_names[0]
        if name not in self.info.served_names:
            raise OpenAIError(404, f"The model `{name}` does not exist. Served models: "
                                   f"{', '.join(self.info.served_names)}", param="model", code="model_not_found")
        return name

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        vocab = self.info.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise bad_request(f"{param}[{i}]: token id {t} is outside the vocabulary [0, {vocab})", param)

    def completion_budget(self, prompt_len: int, max_tokens: int | None, prompt_param: str) -> int:
        """max_tokens for a prompt of `prompt_len` tokens: vLLM's rule, a 400 when the request asks
        for more than the context holds, and the rest of the context when it asks for nothing."""
        limit = self.info.max_model_len
        if prompt_len >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your prompt has "
                              f"{prompt_len} tokens, which leaves no room for a completion. Please reduce the "
                              "length of the prompt.", prompt_param)
        if max_tokens is None:
            return limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                              "completion). Please reduce the length of the prompt or completion.", "max_tokens")
        return max_tokens

    def sampling_params(self, req: SamplingFields, *, max_tokens: int, logprobs: int | None,
                        stream: bool, prompt_logprobs: int | None = None,
                        structured_outputs: StructuredOutputsParams | None = None,
                        keep_special_tokens: bool = False) -> SamplingParams:
        """SamplingParams for a request; a 400 naming the field when a value is out of range.

        Args:
          structured_outputs: the request's output constraint (server/structured.py).
          keep_special_tokens: keep special tokens in the text whatever the request says (a tool
            call parser whose markers are special tokens needs them).
        """
        bias = None
        if req.logit_bias:
            bias = {}
            for key, value in req.logit_bias.items():
                if not key.strip().lstrip("-").isdigit():
                    raise bad_request(f"logit_bias: keys must be token ids, got {key!r}", "logit_bias")
                bias[int(key)] = value
            self.check_token_ids(list(bias), "logit_bias")
        if req.stop_token_ids:
            self.check_token_ids(req.stop_token_ids, "stop_token_ids")
        try:
            return SamplingParams(
                n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                include_stop_str_in_output=req.include_stop_str_in_output, ignore_eos=req.ignore_eos,
                max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs, logit_bias=bias,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens and not keep_special_tokens,
                structured_outputs=structured_outputs,
                spaces_between_special_tokens=req.spaces_between_special_tokens,
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
        except ValueError as e:
            raise bad_request(str(e), param_of_message(str(e), _SAMPLING_FIELDS)) from None

    # -- engine ------------------------------------------------------------------------------
    async def open_streams(self, requests: Sequence[tuple[dict, SamplingParams]], request_id: str
                           ) -> list[tuple[RequestOutput, AsyncIterator[RequestOutput]]]:
        """Admits one engine request per (prompt, params) and waits for each one's first output.

        Waiting for the first output means admission errors (a full queue, a request the engine
        refuses) still become an HTTP status. All or nothing: if one prompt fails, the others are
        aborted. Returns (first output, the rest of the stream) per prompt.
        """
        async def open_one(i: int, prompt: dict, params: SamplingParams):
            stream = self.front.generate(prompt, params, f"{request_id}-{i}")
            try:
                return await stream.__anext__(), stream
            except BaseException:
                await stream.aclose()
                raise

        tasks = [asyncio.ensure_future(open_one(i, *r)) for i, r in enumerate(requests)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # On an error or a cancellation, close every stream so nothing is left running.
            failed = [t for t in tasks if not t.done() or t.cancelled() or t.exception() is not None]
            if failed:
                for t in tasks:
                    t.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for r in results:
                    if isinstance(r, tuple):
                        await r[1].aclose()
        if failed:
            errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
            raise engine_error(errors[0]) if errors else asyncio.CancelledError()
        return [t.result() for t in tasks]

    # -- formatting --------------------------------------------------------------------------
    def logprobs(self, as_token_ids: bool = False) -> LogprobFormatter:
        """The logprob formatter for one request (vLLM's `return_tokens_as_token_ids`)."""
        return LogprobFormatter(self.info.tokenizer, as_token_ids)

    def stop_reason(self, c: CompletionOutput, params: SamplingParams) -> str | int | None:
        """vLLM's stop_reason: the stop string or stop token id that ended the text; None for EOS."""
        if isinstance(c.stop_reason, int) and c.stop_reason not in params.stop_token_ids:
            return None
        return c.stop_reason


def engine_error(e: BaseException) -> BaseException:
    """The HTTP error for an exception from the engine front (other exceptions pass through)."""
    if isinstance(e, QueueFullError):
        return overloaded(f"The server is overloaded ({e}); retry later")
    if isinstance(e, EngineDeadError):
        return overloaded(f"The engine is not running: {e}")
    if isinstance(e, ValueError):
        return bad_request(str(e), param_of_message(str(e), _SAMPLING_FIELDS))
    return e


class StreamedChoices:
    """Turns the engine streams of one request into per-choice updates, counting usage.

    Args:
      opened: (first output, rest of the stream) per prompt, from `Serving.open_streams`.
      n: choices per prompt; choice index = prompt index * n + completion index.
      stream_options: the request's stream_options (usage reporting), or None.
      with_logprobs: tokens are reported even when they add no text yet (a partial character).
    """

    def __init__(self, opened, n: int, stream_options, with_logprobs: bool):
        self.opened = opened
        self.n = n
        self.with_logprobs = with_logprobs
        self.prompt_tokens = sum(len(first.prompt_token_ids) for first, _ in opened)
        self.completion_tokens = 0
        self.include_usage = stream_options is not None and stream_options.include_usage
        self.continuous_usage = self.include_usage and stream_options.continuous_usage_stats

    async def updates(self) -> AsyncIterator[tuple[int, int, CompletionOutput]]:
        """(prompt index, choice index, delta output) for each choice that has news: text, its
        finish reason, or tokens to report logprobs of; nothing more once a choice has finished."""
        finished: set[int] = set()
        async with contextlib.aclosing(merge([prepend(first, rest) for first, rest in self.opened])) as merged:
            async for i, out in merged:
                for c in out.outputs:
                    index = i * self.n + c.index
                    if index in finished:
                        continue
                    self.completion_tokens += len(c.token_ids)
                    if c.finish_reason is not None:
                        finished.add(index)
                    elif not (c.text or (c.token_ids and self.with_logprobs)):
                        continue
                    yield i, index, c

    async def events(self, header: dict[str, Any], choice_of: Callable[[int, int, CompletionOutput], dict],
                     first_choices: Sequence[dict] = ()) -> AsyncIterator[str]:
        """The response's server-sent events: a chunk per `first_choices` entry, then a chunk per
        choice that `choice_of(prompt index, choice index, delta output)` returns for an update
        (one choice, or a list of them: none, or several chunks), the usage chunk if asked for,
        and [DONE]. An error after the stream started becomes an error event."""
        # Every chunk is the header, one choice and the usage field: the header's JSON is
        # written once, so a token costs one small encode (what sse() gives, key for key).
        opening = sse({**header, "choices": []})[:-len("]}\n\n")]

        def chunk(choice) -> str:
            if not self.include_usage:
                return f"{opening}{compact_json(choice)}]}}\n\n"
            usage = self.usage() if self.continuous_usage else None  # running totals, or null
            return f"{opening}{compact_json(choice)}],\"usage\":{compact_json(usage)}}}\n\n"

        for choice in first_choices:
            yield chunk(choice)
        try:
            async with contextlib.aclosing(self.updates()) as updates:
                async for i, index, c in updates:
                    choices = choice_of(i, index, c)
                    for choice in choices if isinstance(choices, list) else [choices]:
                        yield chunk(choice)
            if self.include_usage:
                yield sse({**header, "choices": [], "usage": self.usage()})
        except Exception as e:  # the status line already went out as 200
            yield stream_error_event(e)
        yield SSE_DONE

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)


def stream_error_event(e: Exception) -> str:
    """The SSE event that reports an error once a stream has started (the status is already 200)."""
    err = engine_error(e)
    if not isinstance(err, OpenAIError):
        logger.exception("error while streaming", exc_info=e)
        err = OpenAIError(500, "internal server error; see the server log")
    return sse(error_body(err.status, err.message, err.param, err.code))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def salt_of(body) -> dict:
    """The request's prefix-cache namespace (vLLM's `cache_salt`) as a prompt dict entry."""
    return {"cache_salt": body.cache_salt} if body.cache_salt else {}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
