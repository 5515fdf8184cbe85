"""A stand-in OpenAI completions server that streams pre-rendered chunks, one per `step`
seconds, for every request at once: what `jaxinfer bench serve` measures against it is the
client's own ceiling (a server that costs nothing), to set beside a real server's numbers.

  python benchmarks/device/paced_sse_server.py PORT STEP_SECONDS
"""

import asyncio
import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def _event(choice: dict, **extra) -> str:
    return "data: " + json.dumps({"id": "cmpl-paced", "object": "text_completion", "created": 0,
                                  "model": "paced", "choices": [choice], **extra}) + "\n\n"


def make_app(step: float) -> Starlette:
    async def completions(request):
        n = int((await request.json()).get("max_tokens", 16))
        token = _event({"index": 0, "text": " word", "logprobs": None, "finish_reason": None})
        last = _event({"index": 0, "text": "", "logprobs": None, "finish_reason": "length"},
                      usage={"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1})

        async def events():
            for _ in range(n):
                yield token
                await asyncio.sleep(step)
            yield last
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(_):
        return JSONResponse({})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/health", health)])


if __name__ == "__main__":
    uvicorn.run(make_app(float(sys.argv[2])), port=int(sys.argv[1]), log_level="warning")
