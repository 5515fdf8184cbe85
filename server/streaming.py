"""Async plumbing between engine streams and HTTP: disconnect watching, merging, SSE responses.

The rule throughout: whenever a response ends early (the client went away, an error, shutdown),
every engine stream it opened is closed, which aborts the request and frees its KV pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready.

    Args:
      what: the request, for the log line (its id).
    """

    def __init__(self, what: str = "a request"):
        super().__init__(what)
        self.what = what


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T], what: str = "a request") -> T:
    """Awaits `work`, cancelling it (and raising ClientDisconnected) if the client goes away first.

    Starlette only notices a disconnect while it streams a body; a request still waiting for its
    first token, or a non-streamed one, would otherwise keep its engine slot until it finishes.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected(what)
    return task.result()


async def prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """`first`, then the items of `rest` (closing `rest` however iteration ends)."""
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index of the stream, item) pairs from several streams, in arrival order.

    An error in any stream ends the merge with that error; closing the merge closes every stream.
    """
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[T]):
        try:
            async for item in stream:
                queue.put_nowait((i, item, None))
            queue.put_nowait((i, done, None))
        except Exception as e:  # handed to the consumer, which re-raises it
            queue.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


# One encoder for every chunk: json.dumps with separators builds a new encoder per call, which
# was half of its 4.8 us per chunk (2.2 us with this one, measured on the 2-core CPU).
_COMPACT = json.JSONEncoder(separators=(',', ':'))


def compact_json(data: Any) -> str:
    """Compact, ASCII-only JSON: a raw U+2028 or U+0085 in the text would end the line for
    clients that split lines the way Python's str.splitlines does."""
    return _COMPACT.encode(data)


def sse(data: Any) -> str:
    """One server-sent event carrying `data` as compact JSON."""
    return f"data: {compact_json(data)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that stops as soon as the client disconnects, whatever the
    ASGI server's spec version, and always closes its body iterator (aborting engine requests).

    Args:
      content: the events.
      on_disconnect: called once if the client goes away before the last event went out.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_disconnect: Callable[[], None] | None = None, **kwargs):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kwargs.pop("headers", {})}
        super().__init__(content, headers=headers, **kwargs)
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        sent_all = gone = False
        try:
            async with anyio.create_task_group() as tasks:
                async def stream():
                    nonlocal sent_all, gone
                    try:
                        await self.stream_response(send)
                        sent_all = True
                    except OSError:  # the connection broke while sending
                        gone = True
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                await _wait_for_disconnect(receive)
                gone = True  # not reached when the stream ended first (that cancels this wait)
                tasks.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            # A server shutting down also cancels this; only a client going away counts.
            if gone and not sent_all and self.on_disconnect is not None:
                self.on_disconnect()
