"""An asyncio front for the engine: the engine steps in its own thread, callers stream outputs.

All engine calls happen on the engine thread; callers talk to it through a command queue, so
the step loop needs no locks. `generate` is an async iterator of outputs for one request; when
its consumer goes away (a client disconnects) the request is aborted and its pages freed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import queue
import threading
from typing import AsyncIterator

from jaxinfer.engine.engine import LLMEngine, PromptType
from jaxinfer.outputs import RequestOutput, merge_deltas
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an unexpected error; the message carries its cause."""


class AsyncLLMEngine:
    """Runs an LLMEngine on a background thread.

    Args:
      engine: the engine (already warmed up).
      max_waiting_requests: admission limit; `generate` raises QueueFullError beyond it.
    """

    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 1024):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wakeup = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="jaxinfer-engine", daemon=True)
        self._thread.start()

    # -- caller side --------------------------------------------------------------------------
    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error!r}")
        if self._stopped.is_set():
            raise EngineDeadError("engine is shut down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fut, fn, args))
        self._wakeup.set()
        return fut

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str, *,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as they progress; the last one has `finished=True`.

        Raises ValueError for an invalid request (nothing is queued) and QueueFullError when
        the engine already holds `max_waiting_requests` requests.
        """
        if len(self._streams) >= self.max_waiting_requests:
            raise QueueFullError(f"the engine already holds {len(self._streams)} requests")
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = (loop, stream)
        try:
            await asyncio.wrap_future(self._add(request_id, prompt, params, priority))
        except BaseException as e:
            self._streams.pop(request_id, None)
            if not isinstance(e, ValueError):
                # Cancelled while the engine thread may already be adding it: abort, so no
                # request runs on with nobody reading it (aborting an unknown id is a no-op).
                self._abort_quietly(request_id)
            raise
        finished = False
        cumulative = params.output_kind == RequestOutputKind.CUMULATIVE
        error = None
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                # A consumer that fell behind (many streams on one event loop) takes everything
                # queued in one output, as vLLM's output collector does: the latest cumulative
                # output, or the deltas merged. Under load a chunk then carries several tokens
                # and the server's cost per token falls instead of its backlog growing.
                while not item.finished and not stream.empty():
                    later = stream.get_nowait()
                    if isinstance(later, BaseException):
                        error = later
                        break
                    item = later if cumulative else merge_deltas(item, later)
                yield item
                if item.finished:
                    finished = True
                    return
                if error is not None:
                    raise error
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._abort_quietly(request_id)

    async def abort(self, request_id: str) -> None:
        """Aborts a request; its stream ends with a final output whose finish_reason is "abort"."""
        entry = self._streams.get(request_id)
        await asyncio.wrap_future(self._abort(request_id))
        if entry is not None:
            entry[0].call_soon_threadsafe(entry[1].put_nowait, _aborted_output(request_id))

    def _abort_quietly(self, request_id: str):
        try:
            self._abort(request_id)
        except EngineDeadError:
            pass

    async def call(self, fn, *args):
        """Runs `fn(engine, *args)` where the engine runs (for reads that must not race a step)."""
        return await asyncio.wrap_future(self._call(fn, *args))

    # What runs where the engine runs; an engine in another process sends these instead.
    def _add(self, request_id, prompt, params, priority) -> concurrent.futures.Future:
        return self._submit(functools.partial(self.engine.add_request, priority=priority), request_id, prompt, params)

    def _abort(self, request_id) -> concurrent.futures.Future:
        return self._submit(self.engine.abort_request, request_id)

    def _call(self, fn, *args) -> concurrent.futures.Future:
        return self._submit(fn, self.engine, *args)

    def shutdown(self, timeout: float | None = 10.0):
        self._stopped.set()
        self._wakeup.set()
        self._thread.join(timeout)

    # -- engine thread ------------------------------------------------------------------------
    def _run_commands(self):
        while True:
            try:
                fut, fn, args = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except Exception as e:  # validation errors go back to the caller
                fut.set_exception(e)

    def _dispatch(self, outputs: list[RequestOutput]):
        # One hand-over per event loop per step, not one per output: each call_soon_threadsafe
        # wakes the loop through its self-pipe (a system call and a thread switch), which at
        # 256 streams a step was a large share of the server's time per token.
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _loop(self):
        try:
            while not self._stopped.is_set():
                self._run_commands()
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                else:
                    self._wakeup.wait(timeout=0.1)
                    self._wakeup.clear()
        except BaseException as e:  # a bug or device failure: fail every stream, loudly
            logger.exception("engine loop failed")
            self._error = e
            for loop, stream in list(self._streams.values()):
                loop.call_soon_threadsafe(stream.put_nowait, EngineDeadError(f"engine stopped: {e!r}"))


def _deliver(items) -> None:
    """Puts each output on its stream's queue (on the streams' event loop)."""
    for stream, out in items:
        stream.put_nowait(out)


class QueueFullError(RuntimeError):
    """Too many requests are already queued; the caller should retry later."""


def _aborted_output(request_id: str) -> RequestOutput:
    from jaxinfer.outputs import CompletionOutput

    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=[],
                         outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="abort")],
                         finished=True)
