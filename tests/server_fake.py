"""A scripted engine front for server tests: it records what reaches the engine (prompt and
SamplingParams) and answers with a given text a few characters per output, so the server's
handling of outputs (tool calls, streaming, disconnects) is tested without compiling a model."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx

from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.sampling_params import RequestOutputKind
from jaxinfer.server import ServerSettings, create_app


class ScriptedFront:
    """Answers every request with `reply` (a string, or a function of the prompt text).

    Args:
      tokenizer: the served tokenizer.
      reply: the generated text; each output carries `chunk` characters of it as one "token".
      delay: seconds between outputs; first_delay: seconds before the first one.
    """

    def __init__(self, tokenizer, reply="Hello there.", *, chunk=3, delay=0.0, first_delay=0.0):
        self.engine = SimpleNamespace(
            tokenizer=tokenizer, max_model_len=4096, model_config=SimpleNamespace(vocab_size=tokenizer.vocab_size),
            metrics=EngineMetrics(), model=SimpleNamespace(path="fake"),
            scheduler=SimpleNamespace(num_running=0, num_waiting=0), block_manager=SimpleNamespace(usage=0.0))
        self.reply, self.chunk, self.delay, self.first_delay = reply, chunk, delay, first_delay
        self.requests: list[tuple[dict, object]] = []  # (prompt, SamplingParams) as the engine got them
        self.started = self.completed = self.closed_early = 0

    @property
    def params(self):
        """The SamplingParams of the last request."""
        return self.requests[-1][1]

    @property
    def prompt(self) -> str:
        return self.requests[-1][0]["prompt"]

    async def call(self, fn):
        return fn(self.engine)

    async def generate(self, prompt, params, request_id, *, priority=0):
        self.requests.append((prompt, params))
        self.started += 1
        text = self.reply(prompt["prompt"]) if callable(self.reply) else self.reply
        pieces = [text[i:i + self.chunk] for i in range(0, len(text), self.chunk)][:params.max_tokens]
        finished = False
        try:
            await asyncio.sleep(self.first_delay)
            for k, piece in enumerate(pieces):
                if k:
                    await asyncio.sleep(self.delay)
                last = k == len(pieces) - 1
                if params.output_kind == RequestOutputKind.FINAL_ONLY and not last:
                    continue
                delta = params.output_kind == RequestOutputKind.DELTA
                new_text = piece if delta else "".join(pieces[:k + 1])
                ids = [1] if delta else [1] * (k + 1)
                reason = ("length" if len(pieces) == params.max_tokens else "stop") if last else None
                outputs = [CompletionOutput(index=i, text=new_text, token_ids=ids, finish_reason=reason)
                           for i in range(params.n)]
                yield RequestOutput(request_id, prompt.get("prompt"), prompt["prompt_token_ids"], outputs,
                                    finished=last)
            finished = True
            self.completed += 1
        finally:
            if not finished:
                self.closed_early += 1


def asgi_client(front, **settings) -> httpx.AsyncClient:
    """An httpx client on the app over `front` (in process), with ServerSettings fields."""
    app = create_app(front, ServerSettings(**{"served_model_names": ("fake",), **settings}))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def post(front, path, body, **settings) -> httpx.Response:
    async def go():
        async with asgi_client(front, **settings) as client:
            return await client.post(path, json=body)

    return asyncio.run(go())
