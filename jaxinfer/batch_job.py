"""`jaxinfer batch`: an OpenAI batch file run offline through the engine, resumably.

Each input line is `{"custom_id", "method": "POST", "url": "/v1/completions" or
"/v1/chat/completions", "body"}`; each output line is OpenAI's batch result object,
`{"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
A body becomes engine requests through the server's own code (`prepare_completion`,
`prepare_chat`) and its answer through the server's response builders, so a line gets what
POSTing its body to `jaxinfer serve` would answer: a completion object with status 200, or the
server's 400 error body. A line that never reaches an endpoint (a method other than POST, a url
that is not one of the two) gets `response: null` and an `error` {code, message}, as OpenAI
reports requests that failed without an HTTP answer.

Lines are admitted to one LLMEngine while fewer than `window` of its requests are unfinished, so
the engine batches them; results are appended as their last request finishes, in finishing
order (match them by custom_id). The file handling that makes a rerun resume is in batch_io.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import uuid
from typing import Any, Callable, Iterable

from jaxinfer.batch_io import BatchFileError, BatchRequest, ResultFile, read_requests

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def add_batch_args(p: argparse.ArgumentParser) -> None:
    """The job's own flags (jaxinfer/cli.py adds the engine's)."""
    from jaxinfer.server.tool_parsers import PARSERS  # plain Python: no FastAPI at parse time

    p.add_argument("--input", "--input-file", "-i", required=True,
                   help="OpenAI batch input: one JSON request per line (custom_id, method, url, body)")
    p.add_argument("--output", "--output-file", "-o", required=True,
                   help="where results are appended, one JSON line each; an existing file is resumed: "
                        "the custom_ids already in it are skipped")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model names that request bodies may give (others get a 404 result; the first is "
                        "reported; default: --model)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="parse tool calls out of the text for tool_choice 'auto'; needs --tool-call-parser")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS))
    p.add_argument("--warmup", action="store_true", help="compile every shape bucket before the first request")


@dataclasses.dataclass
class BatchStats:
    """What one run did (lines done by earlier runs are counted apart)."""

    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done_before: int = 0
    elapsed: float = 0.0

    def summary(self) -> str:
        """A few lines for the end of the job: requests, tokens, throughput and time."""
        secs = max(self.elapsed, 1e-9)
        before = f"; {self.done_before} done by an earlier run" if self.done_before else ""
        return (f"batch: {self.succeeded + self.failed} requests in {self.elapsed:.1f} s "
                f"({self.succeeded} succeeded, {self.failed} failed{before})\n"
                f"batch: {self.prompt_tokens} prompt tokens, {self.completion_tokens} generation tokens; "
                f"{self.completion_tokens / secs:.1f} generation tok/s, "
                f"{(self.prompt_tokens + self.completion_tokens) / secs:.1f} total tok/s")


def _ids() -> tuple[str, str]:
    """(the result line's id, its request_id), as OpenAI names them."""
    hex_ = uuid.uuid4().hex
    return f"batch_req_{hex_}", f"req_{hex_}"


def response_record(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """A result line for a request that got an HTTP answer (200 or an error status)."""
    line_id, request_id = _ids()
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def error_record(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A result line for a request that failed without an HTTP answer."""
    return {"id": _ids()[0], "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}


@dataclasses.dataclass
class _Line:
    """A line whose engine requests are running."""

    request: BatchRequest
    engine_ids: list[str]
    build: Callable[[list], dict[str, Any]]  # final outputs, in engine_ids order -> response body
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)


class BatchRunner:
    """Runs batch requests through an LLMEngine and appends each one's result line.

    Args:
      engine: an LLMEngine or a DataParallelEngine (driven here with add_request and step).
      served_names: model names a body may give; the first is reported.
      results: where result lines go (a ResultFile, or anything with `append` and `sync`).
      tool_call_parser: reads tool calls out of chat answers for tool_choice "auto" (None: off).
      window: unfinished engine requests to keep queued (default: twice max_num_seqs per
        replica, so a step never waits for the host to admit more).
      on_result: called with each result line after it is appended (the progress bar).
    """

    def __init__(self, engine, served_names: tuple[str, ...], results, *, tool_call_parser: str | None = None,
                 window: int | None = None, on_result: Callable[[dict], None] | None = None):
        from jaxinfer.server.serving import ModelInfo, Serving

        self.engine = engine
        self.serving = Serving(None, ModelInfo.from_engine(engine, served_names), tool_call_parser)
        self.results = results
        self.window = window or max(2 * engine.config.max_num_seqs * engine.config.data_parallel_size, 8)
        self.on_result = on_result
        self.stats = BatchStats()
        self._running: dict[str, _Line] = {}  # engine request id -> its line

    def run(self, requests: Iterable[BatchRequest]) -> BatchStats:
        """Runs every request; returns the stats (also kept in `self.stats`)."""
        start = time.perf_counter()
        pending = iter(requests)
        exhausted = False
        while True:
            while not exhausted and self.engine.num_unfinished_requests < self.window:
                request = next(pending, None)
                if request is None:
                    exhausted = True
                else:
                    self._admit(request)
            if not self.engine.has_unfinished_requests():
                break
            for out in self.engine.step():
                if out.finished:
                    self._finished(out)
            self.results.sync()
            self.stats.elapsed = time.perf_counter() - start
        self.results.sync()
        self.stats.elapsed = time.perf_counter() - start
        return self.stats

    def _admit(self, request: BatchRequest) -> None:
        """Queues the line's engine requests, or writes its error result at once."""
        from jaxinfer.server.errors import OpenAIError, error_body
        from jaxinfer.server.serving import engine_error

        if request.method != "POST":
            return self._write(error_record(request.custom_id, "invalid_method",
                                            f"method must be POST, got {request.method!r}"))
        if request.url not in ENDPOINTS:
            return self._write(error_record(request.custom_id, "invalid_url",
                                            f"url must be one of {', '.join(ENDPOINTS)}, got {request.url!r}"))
        engine_ids = []
        try:
            prompts, build = self._prepare(request)
            line_id = uuid.uuid4().hex
            for i, (prompt, params) in enumerate(prompts):
                engine_ids.append(f"{line_id}-{i}")
                self.engine.add_request(engine_ids[-1], prompt, params)
        except (OpenAIError, ValueError) as e:
            self.engine.abort_request(engine_ids)  # all or nothing, as the server admits a request
            err = engine_error(e) if isinstance(e, ValueError) else e
            return self._write(response_record(request.custom_id, err.status,
                                               error_body(err.status, err.message, err.param, err.code)))
        line = _Line(request, engine_ids, build)
        for eid in engine_ids:
            self._running[eid] = line

    def _prepare(self, request: BatchRequest):
        """(engine prompt, SamplingParams) per engine request of the line, and the function that
        builds its response body from their final outputs; OpenAIError for a bad body."""
        from pydantic import ValidationError

        from jaxinfer.server.chat import chat_body, prepare_chat
        from jaxinfer.server.completions import completion_body, prepare_completion
        from jaxinfer.server.errors import bad_request, validation_error
        from jaxinfer.server.protocol import ChatCompletionRequest, CompletionRequest
        from jaxinfer.server.serving import new_id

        chat = request.url == "/v1/chat/completions"
        try:
            body = (ChatCompletionRequest if chat else CompletionRequest).model_validate(request.body)
        except ValidationError as e:
            raise validation_error(list(e.errors())) from None
        if body.stream:
            raise bad_request("stream: is not supported in a batch job", "stream")
        model = self.serving.resolve_model(body.model)
        if chat:
            prepared = prepare_chat(self.serving, body)
            return [(prepared.prompt, prepared.params)], lambda outs: chat_body(
                self.serving, body, prepared, outs[0], request_id=new_id("chatcmpl"), model=model)
        prepared = prepare_completion(self.serving, body)
        return prepared.requests, lambda outs: completion_body(
            self.serving, body, prepared, outs, request_id=new_id("cmpl"), model=model)

    def _finished(self, out) -> None:
        line = self._running.pop(out.request_id, None)
        if line is None:
            return
        line.outputs[out.request_id] = out
        if len(line.outputs) == len(line.engine_ids):
            body = line.build([line.outputs[eid] for eid in line.engine_ids])
            self._write(response_record(line.request.custom_id, 200, body))

    def _write(self, record: dict[str, Any]) -> None:
        self.results.append(record)
        response = record["response"]
        if response is not None and response["status_code"] == 200:
            self.stats.succeeded += 1
            self.stats.prompt_tokens += response["body"]["usage"]["prompt_tokens"]
            self.stats.completion_tokens += response["body"]["usage"]["completion_tokens"]
        else:
            self.stats.failed += 1
        if self.on_result is not None:
            self.on_result(record)


def run_batch_job(args: argparse.Namespace, make_engine: Callable[[], Any]) -> int:
    """`jaxinfer batch`: checks both files, builds the engine (only when work is left), runs the
    requests not yet in the output, and prints the summary to stderr.

    Args:
      args: parsed `batch` arguments.
      make_engine: builds the engine from the engine flags (jaxinfer/cli.py owns them): an
        LLMEngine, or a DataParallelEngine with --data-parallel-size.
    Returns:
      0 when every request has a result (failed requests included: each has its error line),
      130 when interrupted (a rerun resumes).
    """
    from tqdm.auto import tqdm

    from jaxinfer.loading.resolve import DEFAULT_MODEL

    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("error: --enable-auto-tool-choice needs --tool-call-parser")
    try:
        requests = read_requests(args.input)
        results = ResultFile(args.output)
    except (OSError, BatchFileError) as e:
        raise SystemExit(f"error: {e}")
    with results:
        ids = {r.custom_id for r in requests}
        foreign = [cid for cid in results.done if cid not in ids]
        if foreign:
            raise SystemExit(f"error: {args.output} holds results for {len(foreign)} custom_id(s) that are not in "
                             f"{args.input} (e.g. {foreign[0]!r}); is it the output of another batch?")
        if results.torn_bytes:
            print(f"batch: cut off the torn last line of {args.output} ({results.torn_bytes} bytes, left by an "
                  "interrupted run)", file=sys.stderr)
        todo = [r for r in requests if r.custom_id not in results.done]
        if results.done:
            print(f"batch: resuming: {len(results.done)} of {len(requests)} results are already in {args.output}",
                  file=sys.stderr)
        if not todo:
            print("batch: nothing left to run", file=sys.stderr)
            return 0
        engine = make_engine()
        with tqdm(total=len(requests), initial=len(results.done), desc="batch", unit="req", file=sys.stderr,
                  dynamic_ncols=True) as bar:
            runner = BatchRunner(engine, tuple(args.served_model_name or [args.model or DEFAULT_MODEL]), results,
                                 tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                                 on_result=lambda record: bar.update(1))
            runner.stats.done_before = len(results.done)
            try:
                stats = runner.run(todo)
            except KeyboardInterrupt:
                bar.close()
                results.sync()
                print(runner.stats.summary(), file=sys.stderr)
                print(f"batch: interrupted; the results so far are in {args.output}; run the same command again "
                      "to resume", file=sys.stderr)
                return 130
    print(stats.summary(), file=sys.stderr)
    print(f"batch: results in {args.output}", file=sys.stderr)
    return 0
