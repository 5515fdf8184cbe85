"""The engine core in its own process, for a front end that must not share its interpreter.

With `AsyncLLMEngine` the engine steps on a thread of the server's process, so HTTP parsing,
chat templates, JSON and streaming compete with the step loop for one GIL. `AsyncEngineCore`
keeps the same API (`generate`, `abort`, `call`, `shutdown`) but runs the engine in a spawned
process (JAX is not fork-safe): the parent sends commands (add, abort, call) over one queue
and a reader thread turns what comes back (replies, each step's outputs) into futures and
stream items. The engine is built in the child by a picklable factory, so the device is
touched only there; the parent keeps only the model's facts (`EngineInfo`) and its own
tokenizer for the HTTP layer.

Everything that crosses is pickled: request outputs (in the compact form of
engine/output_wire.py: each prompt once, token times as they are added), `SamplingParams`,
and the functions given to `call` (module-level functions only). The child pickles each
message itself before queueing it, so a result that cannot be pickled comes back as that error
instead of being dropped by the queue's feeder thread (which would leave the caller waiting
forever).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import traceback
from typing import Any, Callable

from jaxinfer.engine.async_engine import AsyncLLMEngine, EngineDeadError
from jaxinfer.engine.output_wire import OutputDecoder, OutputEncoder

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.05


@dataclasses.dataclass
class EngineInfo:
    """What the front end reads off the engine: the model's facts (and, in the parent, its
    own tokenizer)."""

    model_config: Any
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    model: Any = None  # something with the model's `path`, for the served model card
    tokenizer: Any = None


@dataclasses.dataclass
class _ModelPath:
    path: str


def _put(replies, kind, cid, result, error) -> None:
    """Queues one message, pickled here: a result that cannot be pickled is sent as the error."""
    try:
        data = pickle.dumps((kind, cid, result, error))
    except Exception as e:
        data = pickle.dumps((kind, cid, None, TypeError(f"the engine's reply cannot be pickled: {e}")))
    replies.put(data)


def _request_ids(ids) -> list[str]:
    """An abort's request ids (one id, a sequence of them, or None for none) as a list."""
    return [ids] if isinstance(ids, str) else list(ids or ())


def _core_main(make_engine: Callable[[], Any], commands, replies) -> None:
    """The child: builds the engine, then serves commands and steps while there is work.

    Ctrl-C reaches the whole process group; the parent decides when the engine stops, so the
    child ignores SIGINT. It exits by itself when the parent is gone (killed without a word),
    so an orphan never holds the device."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    try:
        engine = make_engine()
    except BaseException:
        _put(replies, "failed", None, traceback.format_exc(), None)
        return
    encoder = OutputEncoder()
    _put(replies, "ready", None, EngineInfo(engine.model_config, engine.max_model_len, tuple(engine.eos_token_ids),
                                            _ModelPath(str(getattr(engine.model, "path", "")))), None)
    try:
        while True:
            pending = []
            try:  # block briefly only when idle; with work, take what is there and step
                pending.append(commands.get(timeout=_IDLE_POLL_S) if not engine.has_unfinished_requests()
                               else commands.get_nowait())
            except queue.Empty:
                pass
            while True:
                try:
                    pending.append(commands.get_nowait())
                except queue.Empty:
                    break
            if not pending and parent is not None and not parent.is_alive():
                return
            for op, cid, payload in pending:
                if op == "stop":
                    return
                try:
                    if op == "add":
                        request_id, prompt, params, priority = payload
                        result = engine.add_request(request_id, prompt, params, priority=priority)
                    elif op == "abort":
                        result = engine.abort_request(payload)
                        for rid in _request_ids(payload):
                            encoder.forget(rid)
                    else:  # "call"
                        fn, args = payload
                        result = fn(engine, *args)
                    _put(replies, "reply", cid, result, None)
                except Exception as e:  # validation errors go back to the caller
                    _put(replies, "reply", cid, None, e)
            if engine.has_unfinished_requests():
                outputs = engine.step()
                if outputs:
                    _put(replies, "outputs", None, encoder.encode(outputs), None)
    except BaseException:
        _put(replies, "dead", None, traceback.format_exc(), None)


class AsyncEngineCore(AsyncLLMEngine):
    """An asyncio front for an engine running in its own process.

    Args:
      make_engine: a picklable callable (a module-level function or a functools.partial of
        one) that builds the LLMEngine in the child.
      tokenizer: the parent's tokenizer for the HTTP layer (None: the front has none).
      max_waiting_requests: admission limit, as in AsyncLLMEngine.
      startup_timeout: seconds to wait for the child to build and warm up its engine.
    Raises:
      RuntimeError: the child failed to build the engine (its traceback in the message).
    """

    def __init__(self, make_engine: Callable[[], Any], *, tokenizer=None, max_waiting_requests: int = 1024,
                 startup_timeout: float = 1800.0):
        ctx = multiprocessing.get_context("spawn")
        self._commands = ctx.Queue()
        self._replies = ctx.Queue()
        self._process = ctx.Process(target=_core_main, args=(make_engine, self._commands, self._replies),
                                    name="jaxinfer-engine-core", daemon=True)
        self._process.start()
        try:
            kind, _, info, _ = pickle.loads(self._replies.get(timeout=startup_timeout))
        except queue.Empty:
            self._process.kill()
            raise RuntimeError(f"the engine process did not start within {startup_timeout} s") from None
        if kind != "ready":
            self._process.join(5)
            raise RuntimeError(f"the engine process failed to start:\n{info}")
        self.engine = info
        self.engine.tokenizer = tokenizer
        self.max_waiting_requests = max_waiting_requests
        self._streams = {}
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._decoder = OutputDecoder()  # read and written by the reader thread only
        self._aborts: dict[int, object] = {}  # command id -> the request ids it aborts
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read_replies, name="jaxinfer-engine-replies", daemon=True)
        self._thread.start()

    # -- commands -------------------------------------------------------------------------------
    def _send(self, op: str, payload) -> concurrent.futures.Future:
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error!r}")
        if self._stopped.is_set():
            raise EngineDeadError("engine is shut down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            cid = next(self._ids)
            self._futures[cid] = fut
            if op == "abort":  # the reader forgets the request once the engine has aborted it
                self._aborts[cid] = payload
        self._commands.put((op, cid, payload))
        return fut

    def _add(self, request_id, prompt, params, priority) -> concurrent.futures.Future:
        return self._send("add", (request_id, prompt, params, priority))

    def _abort(self, request_id) -> concurrent.futures.Future:
        return self._send("abort", request_id)

    def _call(self, fn, *args) -> concurrent.futures.Future:
        return self._send("call", (fn, args))

    def shutdown(self, timeout: float | None = 10.0):
        if not self._stopped.is_set() and self._process.is_alive():
            self._commands.put(("stop", None, None))
        self._stopped.set()
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
        self._thread.join(timeout)

    # -- replies --------------------------------------------------------------------------------
    def _read_replies(self):
        try:
            self._read_replies_until_done()
        except BaseException as e:  # a message this side cannot take: fail all, never hang
            logger.exception("reading the engine process's replies failed")
            self._fail(RuntimeError(f"reading the engine process's replies failed: {e!r}"))

    def _read_replies_until_done(self):
        while True:
            try:
                kind, cid, result, error = pickle.loads(self._replies.get(timeout=0.5))
            except queue.Empty:
                if self._process.is_alive():
                    continue
                if self._stopped.is_set():
                    return
                self._fail(RuntimeError(f"the engine process exited (code {self._process.exitcode})"))
                return
            except (EOFError, OSError):
                if not self._stopped.is_set():
                    self._fail(RuntimeError("the engine process's queue closed"))
                return
            if kind == "outputs":
                self._dispatch(self._decoder.decode(result))
            elif kind == "reply":
                with self._lock:
                    fut = self._futures.pop(cid, None)
                    aborted = self._aborts.pop(cid, None)
                # Replies come in order after every output sent before them: nothing more will
                # come for an aborted request.
                for rid in _request_ids(aborted):
                    self._decoder.forget(rid)
                if fut is not None and fut.set_running_or_notify_cancel():
                    if error is not None:
                        fut.set_exception(error)
                    else:
                        fut.set_result(result)
            elif kind == "dead":
                logger.error("engine process failed:\n%s", result)
                self._fail(RuntimeError(result.strip().splitlines()[-1]))
                return

    def _fail(self, error: BaseException):
        """Fails every pending command and stream: nothing in flight waits forever."""
        self._error = error
        with self._lock:
            futures, self._futures = list(self._futures.values()), {}
        for fut in futures:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineDeadError(f"engine stopped: {error!r}"))
        for loop, stream in list(self._streams.values()):
            loop.call_soon_threadsafe(stream.put_nowait, EngineDeadError(f"engine stopped: {error!r}"))
