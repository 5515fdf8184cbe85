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
import time
from typing import Any

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
        equal share of the requests and of max_concurrency. One Python client parsing a few
        thousand streamed chunks a second is itself the bound (its own ITL grows), which a
        benchmark of a fast server must not mistake for the server.
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


async def _one_request(client, url: str, body: dict[str, Any], chat: bool) -> RequestResult:
    result = RequestResult()
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[len("data: "):])
                if "error" in data:
                    result.error = str(data["error"].get("message", data["error"]))
                    return result
                if data.get("usage"):
                    result.prompt_tokens = data["usage"]["prompt_tokens"]
                    result.output_tokens = data["usage"]["completion_tokens"]
                for choice in data.get("choices", []):
                    text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    chunks += 1
        result.e2el = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
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
    import httpx

    base = cfg.base_url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    url = base + ("/chat/completions" if cfg.endpoint == "chat" else "/completions")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    gate = asyncio.Semaphore(limit)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)

    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(cfg.timeout), limits=limits) as client:
        async def limited(body):
            async with gate:
                return await _one_request(client, url, body, cfg.endpoint == "chat")

        tasks = []
        for body, offset in zip(bodies, offsets):
            wait = start_at + offset - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.ensure_future(limited(body)))
        results = await asyncio.gather(*tasks)
    return list(results), time.time()


def _send_shard(job) -> tuple[list[RequestResult], float]:
    """One client process's share (a top-level function, so a spawned process can run it)."""
    return asyncio.run(_send(*job))


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
