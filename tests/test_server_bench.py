"""`jaxinfer bench serve` against the live test server, its arrival processes and goodput, its
own HTTP/SSE reading against raw canned responses, and `jaxinfer serve` as a real process: API
key from the environment, SIGTERM drains, then exits."""

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from jaxinfer.cli import main as jaxinfer_main
from jaxinfer.server.bench import (BenchConfig, RequestResult, _Stream, arrival_gaps, make_requests, parse_goodput,
                                   run_benchmark, split_lines)
from tests.server_fixtures import MODEL_NAME, free_port, shared_stack


@pytest.fixture(scope="module")
def stack():
    return shared_stack()


def test_goodput_targets_parse():
    assert parse_goodput(["ttft:200,itl:50", "e2el:1500"]) == {"ttft": 200.0, "itl": 50.0, "e2el": 1500.0}
    for bad in (["ttft"], ["ttft:-1"], ["latency:5"], ["ttft:fast"]):
        with pytest.raises(ValueError, match="goodput targets"):
            parse_goodput(bad)


def test_arrivals_and_lengths():
    cfg = BenchConfig(base_url="http://x", model="m", num_prompts=4000, request_rate=20.0, input_len=50,
                      output_len=10, random_range_ratio=0.5)
    gaps = arrival_gaps(cfg)
    assert abs(gaps.mean() - 1 / 20) < 0.005 and gaps.std() > 0.04  # exponential: std equals mean
    fixed = arrival_gaps(BenchConfig(base_url="http://x", model="m", num_prompts=5, request_rate=4.0,
                                     arrivals="fixed"))
    assert np.allclose(fixed, 0.25)
    assert not arrival_gaps(BenchConfig(base_url="http://x", model="m", num_prompts=3)).any()
    bodies = make_requests(cfg)
    assert bodies == make_requests(cfg)
    words = [len(b["prompt"].split()) for b in bodies]
    assert min(words) == 25 and max(words) == 75
    assert {b["max_tokens"] for b in bodies} == set(range(5, 16))
    with pytest.raises(ValueError, match="request_rate"):
        BenchConfig(base_url="http://x", model="m", request_rate=0)


def test_benchmark_against_the_server(stack):
    cfg = BenchConfig(base_url=stack.url, model=MODEL_NAME, num_prompts=16, request_rate=40.0, input_len=8,
                      output_len=12, max_concurrency=4, ignore_eos=True, goodput={"ttft": 60_000.0})
    s = asyncio.run(run_benchmark(cfg))
    assert s["completed"] == 16 and s["failed"] == 0, s["errors"]
    assert s["total_output_tokens"] == 16 * 12
    assert s["total_input_tokens"] >= 16 * 8
    for name in ("ttft", "itl", "tpot", "e2el"):
        assert 0 < s[f"p50_{name}_ms"] <= s[f"p90_{name}_ms"] <= s[f"p99_{name}_ms"]
    assert s["p99_ttft_ms"] <= s["p99_e2el_ms"]
    assert s["goodput"] == pytest.approx(s["request_throughput"])
    assert s["request_throughput"] == pytest.approx(16 / s["duration_s"])
    impossible = asyncio.run(run_benchmark(
        BenchConfig(**{**cfg.__dict__, "num_prompts": 4, "goodput": {"ttft": 0.001}})))
    assert impossible["completed"] == 4 and impossible["goodput"] == 0


def test_benchmark_from_several_client_processes(stack):
    """Two spawned client processes share the requests (lengths drawn per request) and the
    concurrency; every request is sent once and its tokens counted once."""
    cfg = BenchConfig(base_url=stack.url, model=MODEL_NAME, num_prompts=10, input_len=6, output_len=8,
                      random_range_ratio=0.5, max_concurrency=3, ignore_eos=True, client_processes=2)
    s = asyncio.run(run_benchmark(cfg))
    assert s["completed"] == 10 and s["failed"] == 0, s["errors"]
    assert s["total_output_tokens"] == sum(b["max_tokens"] for b in make_requests(cfg))
    assert s["request_throughput"] == pytest.approx(10 / s["duration_s"])
    assert 0 < s["p50_ttft_ms"] <= s["p99_e2el_ms"]
    with pytest.raises(ValueError, match="client_processes"):
        BenchConfig(base_url="http://x", model="m", num_prompts=4, max_concurrency=2, client_processes=3)


def test_bench_cli_writes_json(stack, tmp_path, capsys):
    out = tmp_path / "result.json"
    rc = jaxinfer_main(["bench", "serve", "--base-url", stack.url + "/v1", "--model", MODEL_NAME, "--endpoint",
                        "chat", "--num-prompts", "4", "--request-rate", "inf", "--input-len", "4",
                        "--output-len", "6", "--goodput", "ttft:60000,itl:60000", "--result-file", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 4 and result["config"]["endpoint"] == "chat"
    assert result["config"]["request_rate"] == "inf" and "goodput" in result
    assert result["command"].startswith("jaxinfer") and result["date"].startswith("20")
    assert "TTFT (ms)" in capsys.readouterr().out
    bad = jaxinfer_main(["bench", "serve", "--base-url", stack.url, "--model", "nope", "--num-prompts", "2"])
    assert bad == 1  # every request failed (unknown model)


# Chunks as servers write them: escaped quotes and backslashes, raw multi-byte UTF-8 (vLLM does
# not escape it; U+2028 is no line break in SSE), \\u escapes, an empty text with the finish
# reason, a usage-only last chunk, and lines that are not data.
_COMPLETION_EVENTS = [
    json.dumps({"id": "c", "choices": [{"index": 0, "text": 'say "hi" \\ back\\slash', "finish_reason": None}]}),
    json.dumps({"id": "c", "choices": [{"index": 0, "text": "東京 🙂 café\u2028x\u0085", "logprobs": None}]},
               ensure_ascii=False),
    json.dumps({"id": "c", "choices": [{"index": 0, "text": "Привет"}]}),
    json.dumps({"id": "c", "choices": [{"index": 0, "text": "line\nbreak: data: [DONE]\r\n"}]}),
    json.dumps({"id": "c", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}),
    json.dumps({"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}),
    "[DONE]",
]
_CHAT_EVENTS = [
    json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
    json.dumps({"choices": [{"index": 0, "delta": {"content": '{"a": "b\\"c"}'}}]}),
    json.dumps({"choices": [{"index": 0, "delta": {"content": "ü"}, "logprobs": {"content": [{"token": "x"}]}}]},
               ensure_ascii=False),
    json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]}),
    json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}),
    json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
    "[DONE]",
]


def _sse_body(events: list[str], newline: str) -> bytes:
    """Events as a server streams them, with a comment and a named event among them."""
    lines = [": keep-alive", "event: message"] + [f"data: {e}{newline}" for e in events]
    return newline.join(lines).encode()


def _reference(body: bytes, chat: bool) -> tuple[int, int, int, list[int]]:
    """Token chunks, prompt and output tokens from usage, and the indices of the events with text,
    parsed line by line with json.loads as the client did before it read raw bytes."""
    chunks, prompt, output, timed = 0, 0, 0, []
    events = [line for line in re.split("\r\n|\r|\n", body.decode()) if line.startswith("data: ")]
    for i, line in enumerate(events):
        if line == "data: [DONE]":
            continue
        data = json.loads(line[len("data: "):])
        if data.get("usage"):
            prompt, output = data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"]
        for choice in data.get("choices", []):
            if choice.get("delta", {}).get("content") if chat else choice.get("text"):
                chunks += 1
                timed.append(i)
    return chunks, prompt, output, timed


def _feed(pieces: list[bytes], chat: bool, times: list[float] | None = None) -> tuple[_Stream, RequestResult]:
    result = RequestResult()
    stream = _Stream(result, 0.0, chat)
    stream.status = 200
    for i, piece in enumerate(pieces):
        assert stream.feed(piece, times[i] if times else 1.0)
    stream.end(2.0)
    return stream, result


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_sse_reading_matches_json_loads_line_by_line(chat, newline):
    """However the bytes are cut into reads, the raw-byte reader counts the same chunks and usage
    as json.loads on each line, and times each event by the read that completed it."""
    events = _CHAT_EVENTS if chat else _COMPLETION_EVENTS
    body = _sse_body(events, newline)
    chunks, prompt, output, timed = _reference(body, chat)
    assert chunks == 4 if not chat else chunks == 2
    rng = random.Random(0)
    cuts = [[i] for i in range(len(body) + 1)] + [sorted(rng.sample(range(len(body)), 12)) for _ in range(50)]
    for cut in cuts:
        bounds = [0, *cut, len(body)]
        stream, result = _feed([body[a:b] for a, b in zip(bounds, bounds[1:])], chat)
        assert (stream.chunks, result.prompt_tokens, result.output_tokens) == (chunks, prompt, output)
        assert not result.error
        assert len(result.itls) == chunks - 1
    # One event per read, read i at time i + 1: TTFT and ITL come from the reads with text.
    lines = [line + newline.encode() for line in body.split(newline.encode())]
    data_index = [i for i, line in enumerate(lines) if line.startswith(b"data: ")]
    stream, result = _feed(lines, chat, times=[float(i + 1) for i in range(len(lines))])
    at = [data_index[i] + 1.0 for i in timed]
    assert result.ttft == at[0] and result.itls == [b - a for a, b in zip(at, at[1:])]


def test_sse_lines_and_errors():
    assert split_lines(b"data: a\n\ndata: b\r\ndata: c") == ([b"data: a", b"", b"data: b"], b"data: c")
    assert split_lines(b"partial") == ([], b"partial")
    # The last line needs no line break, and an error event ends the request with its message.
    stream, result = _feed([b'data: {"choices": [{"text": "x"}]}\n\ndata: {"choices": [{"text": "y"}]}'], False)
    assert stream.chunks == 2 and result.itls == [1.0]
    result = RequestResult()
    stream = _Stream(result, 0.0, False)
    stream.status = 200
    assert not stream.feed(b'data: {"choices": [{"text": "x"}]}\n\ndata: {"error": {"message": "boom"}}\n\n', 1.0)
    assert result.error == "boom"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _framed(body: bytes, framing: str) -> tuple[bytes, list[bytes]]:
    """Response headers and body pieces: chunked in pieces of 7 bytes, or a Content-Length, or
    neither (the body ends when the server closes the connection)."""
    if framing == "chunked":
        pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
        return b"Transfer-Encoding: chunked\r\n", [_chunk(p) for p in pieces] + [b"0\r\n\r\n"]
    if framing == "length":
        return b"Content-Length: %d\r\n" % len(body), [body[i:i + 11] for i in range(0, len(body), 11)]
    return b"Connection: close\r\n", [body[i:i + 5] for i in range(0, len(body), 5)]


def _completion_stream(n: int) -> bytes:
    events = [json.dumps({"choices": [{"index": 0, "text": f" t{i}"}]}) for i in range(n)]
    events.append(json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": n}}))
    return _sse_body(events + ["[DONE]"], "\n")


async def _raw_server(connections: list[int]):
    """A server that answers by the request's model name: "chunked", "length", "close" (SSE with
    that framing), "paced" (a token every 20 ms), "cut" (closed mid-stream), "stall" (silent after
    one token), "streamed-error" (an error event) and "missing" (a 404)."""

    async def answer(writer, model: str, n: int) -> bool:
        if model == "missing":
            body = b'{"error": {"message": "no such model"}}'
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return True
        framing = model if model in ("chunked", "length", "close") else "chunked"
        body = _completion_stream(n)
        if model == "streamed-error":
            events = [json.dumps({"choices": [{"text": " t0"}]}), '{"error": {"message": "engine died"}}']
            body = _sse_body(events, "\n")
        headers, pieces = _framed(body, framing)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + headers + b"\r\n")
        if model == "paced":  # one HTTP chunk per event
            pieces = [_chunk(e + b"\n\n") for e in body.split(b"\n\n") if e] + [b"0\r\n\r\n"]
        for i, piece in enumerate(pieces):
            if model == "cut" and i == len(pieces) // 2:
                return False
            if model == "stall" and i == 3:
                await asyncio.sleep(5)
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02 if model == "paced" else 0)
        return framing != "close"

    async def handle(reader, writer):
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])
                request = json.loads(await reader.readexactly(length))
                if not await answer(writer, request["model"], request["max_tokens"]):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("model,completed,connections", [
    ("chunked", 3, 1), ("length", 3, 1), ("close", 3, 3), ("paced", 3, 1), ("cut", 0, 3), ("stall", 0, 3),
    ("streamed-error", 0, 3), ("missing", 0, 1)])
def test_http_reading_against_raw_responses(model, completed, connections):
    """The client's own HTTP/1.1 reading: each framing of the body, keep-alive reuse (one request
    at a time, so one connection unless the server closes it), and each way a request fails."""
    seen = []

    async def run():
        server = await _raw_server(seen)
        port = server.sockets[0].getsockname()[1]
        cfg = BenchConfig(base_url=f"http://127.0.0.1:{port}", model=model, num_prompts=3, input_len=4,
                          output_len=6, max_concurrency=1, timeout=0.5)
        try:
            return await run_benchmark(cfg)
        finally:
            server.close()

    s = asyncio.run(run())
    assert s["completed"] == completed and len(seen) == connections, (s["errors"], len(seen))
    if completed:
        assert s["total_output_tokens"] == 18 and s["total_input_tokens"] == 12
        assert s["p50_ttft_ms"] > 0 and s["p50_e2el_ms"] >= s["p50_ttft_ms"]
    if model == "paced":
        assert 15 < s["p50_itl_ms"] < 100 and 15 < s["p50_tpot_ms"] < 100
    errors = {"cut": "ConnectionError", "stall": "TimeoutError", "streamed-error": "engine died",
              "missing": "HTTP 404: {\"error\": {\"message\": \"no such model\"}}"}
    if model in errors:
        assert len(s["errors"]) == 1 and s["errors"][0].startswith(errors[model]), s["errors"]


@pytest.mark.parametrize("engine_process", [False, True])
def test_serve_process_drains_on_sigterm(stack, tmp_path, engine_process):
    port = free_port()
    env = {**os.environ, "JAXINFER_API_KEY": "from-env", "JAXINFER_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "jaxinfer.cli", "serve", "--model", str(stack.checkpoint), "--port", str(port),
           "--served-model-name", "tiny", "--max-model-len", "128", "--max-num-seqs", "2",
           "--max-num-batched-tokens", "16", "--page-size", "8", "--num-pages", "64", "--log-level", "warning",
           *(["--engine-process"] if engine_process else [])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.25)
        children = _children(proc.pid)
        assert httpx.get(url + "/v1/models").status_code == 401
        headers = {"Authorization": "Bearer from-env"}
        assert httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 60, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if not events:
                        proc.send_signal(signal.SIGTERM)
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 60
        # uvicorn re-raises the signal once it has drained, so the exit reads as SIGTERM's.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        output = proc.stdout.read()
        assert "Traceback" not in output
        if engine_process:  # the engine's process stopped with the server, leaving no orphan
            deadline = time.monotonic() + 20
            while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert children and not any(_alive(pid) for pid in children), (children, output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
