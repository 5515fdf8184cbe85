"""`jaxinfer bench serve`: a client-side benchmark of any OpenAI-compatible server.

Requests arrive as a Poisson process (or at a fixed rate, or all at once), each streams its
answer, and the client measures time to first token (TTFT), inter-token latency (ITL, the gaps
between streamed chunks), end-to-end latency (E2E) and throughput. Goodput counts the requests
per second that met every latency target given with `--goodput`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import ssl
import time
import urllib.parse
from typing import Any

import httptools
import numpy as np

# Common English words: about one token each in most tokenizers, so a prompt of k words is
# close to k tokens; the exact count comes back in the usage the server reports.
_WORDS = ("the of and to in is that it was for on are as with his they at be this from have or by one had "
          "not but what all were when we there can an your which their said if do will each about how up out "
          "them then she many some so these would other into has more her two like him see time could no make "
          "than first been its who now people my made over did down only way find use may water long little "
          "very after words called just where most know").split()
GOODPUT_METRICS = ("ttft", "itl", "tpot", "e2el")


@dataclasses.dataclass
class BenchConfig:
    """What to send and how fast.

    Attributes:
      base_url: the server, e.g. http://127.0.0.1:8000 (with or without /v1).
      model: the model name to send.
      endpoint: "completions" or "chat".
      num_prompts: requests to send.
      request_rate: requests per second; math.inf sends them all at once.
      arrivals: "poisson" (exponential gaps) or "fixed" (equal gaps).
      input_len, output_len: prompt words and max_tokens per request.
      random_range_ratio: lengths are drawn uniformly from [len * (1 - r), len * (1 + r)].
      max_concurrency: requests in flight at once (None: no limit).
      goodput: latency targets in ms by metric name (ttft, itl, tpot, e2el).
      ignore_eos: ask the server to keep generating past EOS (vLLM's extension).
      client_processes: processes sending the requests, each with its own event loop and an
        equal share of the requests and of max_concurrency. A client that reads more chunks a
        second than its core can parse is itself the bound (its own ITL grows), which a
        benchmark of a fast server must not mistake for the server. One process spent 10-25 us
        of CPU a streamed chunk on a 2-core CPU machine (47k chunks a second in under half a core).
    """

    base_url: str
    model: str
    endpoint: str = "completions"
    num_prompts: int = 100
    request_rate: float = math.inf
    arrivals: str = "poisson"
    input_len: int = 128
    output_len: int = 128
    random_range_ratio: float = 0.0
    max_concurrency: int | None = None
    goodput: dict[str, float] = dataclasses.field(default_factory=dict)
    ignore_eos: bool = False
    api_key: str | None = None
    seed: int = 0
    timeout: float = 600.0
    client_processes: int = 1

    def __post_init__(self):
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be completions or chat, got {self.endpoint!r}")
        if self.arrivals not in ("poisson", "fixed"):
            raise ValueError(f"arrivals must be poisson or fixed, got {self.arrivals!r}")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be positive")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive (or inf), got {self.request_rate}")
        if not 0.0 <= self.random_range_ratio < 1.0:
            raise ValueError(f"random_range_ratio must be in [0, 1), got {self.random_range_ratio}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be positive, got {self.max_concurrency}")
        if self.client_processes < 1:
            raise ValueError(f"client_processes must be positive, got {self.client_processes}")
        if self.client_processes > min(self.num_prompts, self.max_concurrency or self.num_prompts):
            raise ValueError(f"client_processes {self.client_processes} is more than the requests or the "
                             "concurrency to share among them")
        unknown = set(self.goodput) - set(GOODPUT_METRICS)
        if unknown:
            raise ValueError(f"goodput metrics must be among {GOODPUT_METRICS}, got {sorted(unknown)}")
        url = urllib.parse.urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http:// or https:// address, got {self.base_url!r}")


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:200", "itl:50"] or ["ttft:200,itl:50"] -> {"ttft": 200.0, "itl": 50.0} (milliseconds)."""
    out = {}
    for item in items or []:
        for part in item.split(","):
            name, sep, value = part.partition(":")
            try:
                ms = float(value)
            except ValueError:
                ms = math.nan
            if not sep or name not in GOODPUT_METRICS or not ms > 0:
                raise ValueError(f"goodput targets look like ttft:MS,itl:MS with MS > 0 (metrics "
                                 f"{', '.join(GOODPUT_METRICS)}), got {part!r}")
            out[name] = ms
    return out


@dataclasses.dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itls: list[float] = dataclasses.field(default_factory=list)
    e2el: float = 0.0

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def _lengths(cfg: BenchConfig, base: int, rng: np.random.Generator) -> np.ndarray:
    lo = max(1, int(base * (1 - cfg.random_range_ratio)))
    hi = max(lo, int(base * (1 + cfg.random_range_ratio)))
    return rng.integers(lo, hi + 1, size=cfg.num_prompts)


def make_requests(cfg: BenchConfig) -> list[dict[str, Any]]:
    """The request bodies, reproducible from the seed."""
    rng = np.random.default_rng(cfg.seed)
    bodies = []
    for n_in, n_out in zip(_lengths(cfg, cfg.input_len, rng), _lengths(cfg, cfg.output_len, rng)):
        text = " ".join(rng.choice(_WORDS, size=int(n_in)))
        body: dict[str, Any] = {"model": cfg.model, "max_tokens": int(n_out), "temperature": 0.0, "stream": True,
                                "stream_options": {"include_usage": True}}
        if cfg.ignore_eos:
            body["ignore_eos"] = True
        if cfg.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        bodies.append(body)
    return bodies


def arrival_gaps(cfg: BenchConfig) -> np.ndarray:
    """Seconds to wait before each request."""
    if math.isinf(cfg.request_rate):
        return np.zeros(cfg.num_prompts)
    if cfg.arrivals == "fixed":
        return np.full(cfg.num_prompts, 1.0 / cfg.request_rate)
    return np.random.default_rng(cfg.seed + 1).exponential(1.0 / cfg.request_rate, cfg.num_prompts)


def split_lines(buf: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines of buf (ended by LF, CRLF or CR, the endings SSE allows) and the
    unfinished rest. A CRLF cut between two reads leaves an extra empty line, which SSE ignores;
    a line break is never inside a multi-byte UTF-8 character, so lines split as bytes."""
    end = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
    if end < 0:
        return [], buf
    done, rest = buf[:end + 1], buf[end + 1:]
    if b"\r" in done:
        done = done.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return done[:-1].split(b"\n"), rest


class _Stream:
    """One request's streamed response: its SSE lines parsed as they arrive, each event timed by
    the clock reading of the socket read that brought it (one reading per read, not per event)."""

    __slots__ = ("result", "chat", "start", "last", "chunks", "tail", "status", "error_body")

    def __init__(self, result: RequestResult, start: float, chat: bool):
        self.result, self.chat, self.start, self.last = result, chat, start, start
        self.chunks = 0
        self.tail = b""
        self.status = 0
        self.error_body = b""

    def feed(self, body: bytes, now: float) -> bool:
        """Parses body's complete lines; False once the server streamed an error (stop reading)."""
        if self.status != 200:
            self.error_body = (self.error_body + body)[:4096]  # only the start is reported
            return True
        lines, self.tail = split_lines(self.tail + body)
        return self._lines(lines, now)

    def end(self, now: float) -> None:
        """The stream ended: a last line without a line break still counts, as in aiter_lines."""
        if self.status == 200 and self.tail:
            tail, self.tail = self.tail, b""
            self._lines([tail], now)

    def _lines(self, lines: list[bytes], now: float) -> bool:
        for line in lines:  # a plain loop, no generator: this runs for every streamed chunk
            if line.startswith(b"data: ") and line != b"data: [DONE]" and not self._event(json.loads(line[6:]), now):
                self.tail = b""  # nothing after an error event is read
                return False
        return True

    def _event(self, data: dict[str, Any], now: float) -> bool:
        result = self.result
        if "error" in data:
            result.error = str(data["error"].get("message", data["error"]))
            return False
        if data.get("usage"):
            result.prompt_tokens = data["usage"]["prompt_tokens"]
            result.output_tokens = data["usage"]["completion_tokens"]
        for choice in data.get("choices", []):
            text = choice.get("delta", {}).get("content") if self.chat else choice.get("text")
            if not text:
                continue
            if self.chunks == 0:
                result.ttft = now - self.start
            else:
                result.itls.append(now - self.last)
            self.last = now
            self.chunks += 1
        return True


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection. httptools (C) parses the response and its chunked
    framing, and each body piece goes to the request's _Stream inside the socket callback: no
    task switch, async iterator or Python HTTP parser per streamed chunk. Through httpx and h11
    a chunk cost the client ~190 us, where 256 streams at one chunk per 15 ms leave it 58 us."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.stream: _Stream | None = None  # the response being read; None between requests
        self.parser: httptools.HttpResponseParser | None = None
        self.done: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.reusable = False
        self.framed = False  # the body's end is given (length or chunked), not the connection's close
        self.now = 0.0  # the clock at the last socket read

    async def request(self, data: bytes, stream: _Stream, timeout: float) -> float:
        """Sends data and parses the response into stream; returns the clock reading of the read
        that ended the response. Fails after `timeout` seconds without a byte, as httpx's read
        timeout does."""
        loop = asyncio.get_running_loop()
        self.stream, self.reusable, self.framed = stream, False, False
        self.parser = httptools.HttpResponseParser(self)
        self.done = loop.create_future()
        self.now = time.perf_counter()
        self.timer = loop.call_later(timeout, self._check_idle, timeout)
        self.transport.write(data)
        try:
            return await self.done
        finally:
            self.timer.cancel()

    def _check_idle(self, timeout: float) -> None:
        # Re-armed from the last read instead of reset on every read, which would cost a timer per chunk.
        idle = time.perf_counter() - self.now
        if idle < timeout:
            self.timer = asyncio.get_running_loop().call_later(timeout - idle, self._check_idle, timeout)
        else:
            self._fail(TimeoutError(f"no data from the server for {timeout:g} s"))

    def _finish(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None and not self.done.done():
            stream.end(self.now)
            self.done.set_result(self.now)

    def _fail(self, exc: BaseException) -> None:
        self.stream, self.reusable = None, False
        if not self.done.done():
            self.done.set_exception(exc)
        self.transport.close()

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.stream is None:  # nothing was asked: the connection is out of step, drop it
            self.closed = True
            self.transport.close()
            return
        self.now = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:  # raised in a callback below: report that
            self._fail(e.__context__ or e)
        except Exception as e:
            self._fail(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.stream is None:
            return
        if exc is None and self.stream.status and not self.framed:
            self._finish()  # a body without length or chunks ends with the connection
        else:
            self._fail(exc or ConnectionError("the server closed the connection before the response ended"))

    # httptools.HttpResponseParser callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.stream.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.stream is not None and not self.stream.feed(body, self.now):
            self._finish()  # an error event: the rest of the stream is not read, so the connection
            self.closed = True  # cannot carry another request
            self.transport.close()

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        self._finish()


class _Pool:
    """Keep-alive connections to one server, at most as many as requests in flight. They go to
    the server directly: proxies named in the environment are not used, since the benchmark
    measures the server."""

    def __init__(self, url: str, timeout: float):
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.netloc, self.path = parts.netloc, parts.path
        self.timeout = timeout
        self.idle: list[_Connection] = []

    async def acquire(self) -> _Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        _, conn = await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(_Connection, self.host, self.port, ssl=self.ssl),
            self.timeout)
        return conn

    def release(self, conn: _Connection) -> None:
        if conn.reusable and not conn.closed and conn.stream is None:
            self.idle.append(conn)
        elif not conn.closed:
            conn.closed = True
            conn.transport.close()

    def close(self) -> None:
        for conn in self.idle:
            conn.transport.close()
        self.idle.clear()


def _post(pool: _Pool, body: dict[str, Any], api_key: str | None) -> bytes:
    """The whole HTTP request: one write, whose response is read on the same connection."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (f"POST {pool.path} HTTP/1.1\r\nHost: {pool.netloc}\r\nUser-Agent: jaxinfer-bench\r\n"
            f"Accept: */*\r\nContent-Type: application/json\r\n{auth}Content-Length: {len(payload)}\r\n\r\n")
    return head.encode("latin-1") + payload


async def _one_request(pool: _Pool, request: bytes, chat: bool) -> RequestResult:
    result = RequestResult()
    start = time.perf_counter()
    try:
        conn = await pool.acquire()
        stream = _Stream(result, start, chat)
        try:
            end = await conn.request(request, stream, pool.timeout)
        finally:
            pool.release(conn)
        if stream.status != 200:
            text = stream.error_body.decode("utf-8", errors="replace")
            result.error = f"HTTP {stream.status}: {text[:300]}"
            return result
        if result.error:
            return result
        result.e2el = end - start
        result.output_tokens = result.output_tokens or stream.chunks
        result.ok = True
    except Exception as e:  # a failed request is a result, not the end of the benchmark
        result.error = f"{type(e).__name__}: {e}"
    return result


def _percentiles(values_s: list[float], name: str) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    if ms.size == 0:
        return {f"{stat}_{name}_ms": 0.0 for stat in ("mean", "median", "p50", "p90", "p99")}
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            **{f"p{p}_{name}_ms": float(np.percentile(ms, p)) for p in (50, 90, 99)}}


def _meets(r: RequestResult, targets: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2el, "itl": max(r.itls, default=0.0)}
    return all(values[name] * 1000.0 <= ms for name, ms in targets.items())


def summarize(cfg: BenchConfig, results: list[RequestResult], duration: float) -> dict[str, Any]:
    """The benchmark's numbers (latencies in milliseconds, throughputs per second)."""
    ok = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "config": {**dataclasses.asdict(cfg), "api_key": None,
                   "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate},
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        **_percentiles([r.ttft for r in ok], "ttft"),
        **_percentiles([x for r in ok for x in r.itls], "itl"),
        **_percentiles([r.tpot for r in ok if r.output_tokens > 1], "tpot"),
        **_percentiles([r.e2el for r in ok], "e2el"),
    }
    if cfg.goodput:
        summary["goodput"] = sum(_meets(r, cfg.goodput) for r in ok) / duration
    return summary


async def _send(cfg: BenchConfig, bodies: list[dict[str, Any]], offsets: np.ndarray, start_at: float,
                limit: int) -> tuple[list[RequestResult], float]:
    """Sends bodies[i] at wall-clock time start_at + offsets[i], at most `limit` in flight;
    returns the results and the wall-clock time the last one ended."""
    base = cfg.base_url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    pool = _Pool(base + ("/chat/completions" if cfg.endpoint == "chat" else "/completions"), cfg.timeout)
    gate = asyncio.Semaphore(limit)

    async def limited(body):
        async with gate:
            return await _one_request(pool, _post(pool, body, cfg.api_key), cfg.endpoint == "chat")

    try:
        tasks = []
        for body, offset in zip(bodies, offsets):
            wait = start_at + offset - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.ensure_future(limited(body)))
        results = await asyncio.gather(*tasks)
    finally:
        pool.close()
    return list(results), time.time()


def run_event_loop(coro):
    """Runs coro on uvloop where it is installed: its socket reads cost the client a fraction of
    the default loop's per streamed chunk."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _send_shard(job) -> tuple[list[RequestResult], float]:
    """One client process's share (a top-level function, so a spawned process can run it)."""
    return run_event_loop(_send(*job))


async def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Sends the requests, waits for every one, and returns `summarize`'s numbers."""
    bodies = make_requests(cfg)
    offsets = np.cumsum(arrival_gaps(cfg))
    limit = cfg.max_concurrency or cfg.num_prompts
    n = cfg.client_processes
    if n == 1:
        start = time.time()
        results, end = await _send(cfg, bodies, offsets, start, limit)
        return summarize(cfg, results, end - start)
    import concurrent.futures
    import multiprocessing

    # Request i goes to process i % n, which keeps the arrival schedule: every process waits
    # for the same wall-clock start, set far enough ahead for the processes to spawn and import.
    start = time.time() + 3.0
    jobs = [(cfg, bodies[p::n], offsets[p::n], start, limit // n + (p < limit % n)) for p in range(n)]
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        shards = await asyncio.gather(*(loop.run_in_executor(pool, _send_shard, job) for job in jobs))
    results = [None] * cfg.num_prompts
    for p, (shard, _) in enumerate(shards):
        results[p::n] = shard
    return summarize(cfg, results, max(end for _, end in shards) - start)


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{'completed requests':<28}{s['completed']} ({s['failed']} failed)",
             f"{'duration (s)':<28}{s['duration_s']:.2f}",
             f"{'request throughput (req/s)':<28}{s['request_throughput']:.2f}",
             f"{'output tokens/s':<28}{s['output_throughput']:.1f}",
             f"{'total tokens/s':<28}{s['total_token_throughput']:.1f}"]
    if "goodput" in s:
        lines.append(f"{'goodput (req/s)':<28}{s['goodput']:.2f}")
    for name in ("ttft", "itl", "tpot", "e2el"):
        lines.append(f"{name.upper() + ' (ms)':<28}mean {s[f'mean_{name}_ms']:.1f}  P50 {s[f'p50_{name}_ms']:.1f}  "
                     f"P90 {s[f'p90_{name}_ms']:.1f}  P99 {s[f'p99_{name}_ms']:.1f}")
    for e in s["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)
