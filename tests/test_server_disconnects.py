"""Clients hanging up at random points (before the first token, mid-stream, while waiting for a
non-streamed answer) against a live server: each is logged once at INFO and counted in
jaxinfer:request_disconnects_total, its engine request is aborted, and nothing is logged as an
error or with a traceback. The engine is scripted (slow, long answers), so every client hangs up
before its answer could have finished."""

import asyncio
import json
import logging
import random
import re
import time

import httpx
import pytest

from jaxinfer.tokenizer import Tokenizer
from jaxinfer.server import ServerSettings, create_app
from tests.server_fake import ScriptedFront
from tests.server_fixtures import LiveServer, train_tokenizer

CLIENTS = 50
FIRST_TOKEN_DELAY = 0.4  # seconds before the scripted engine's first output
ANSWER = "word " * 600  # 1000 outputs of 3 characters, 4 ms apart: 4 s, far longer than any client stays


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def server_and_log(tmp_path):
    train_tokenizer(tmp_path)
    front = ScriptedFront(Tokenizer.from_directory(tmp_path), ANSWER, chunk=3, delay=0.004,
                          first_delay=FIRST_TOKEN_DELAY)
    server = LiveServer(create_app(front, ServerSettings(served_model_names=("fake",))))
    captured = Captured()
    watched = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")]
    for logger in watched:
        logger.addHandler(captured)
    server_logger = logging.getLogger("jaxinfer.server")
    level = server_logger.level
    server_logger.setLevel(logging.INFO)
    server.start()
    try:
        yield front, server, captured
    finally:
        server.stop()
        server_logger.setLevel(level)
        for logger in watched:
            logger.removeHandler(captured)


ROUTES = [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"input": "hi"}),
]


async def hang_up(port: int, rng: random.Random) -> str:
    """Sends one request and goes away at a random point; returns where it went away."""
    path, body = rng.choice(ROUTES)
    stream = rng.random() < 0.6
    when = rng.choice(["before the first token", "mid-stream" if stream else "before the answer"])
    payload = json.dumps({**body, "model": "fake", "max_tokens" if "messages" in body or "prompt" in body
                          else "max_output_tokens": 2000, "stream": stream}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    if when == "before the first token":
        await asyncio.sleep(rng.uniform(0.0, FIRST_TOKEN_DELAY / 2))
    elif when == "mid-stream":
        wanted, seen = rng.randint(1, 60), 0
        while seen < wanted:
            line = await asyncio.wait_for(reader.readline(), 10)
            assert line, "the server closed the stream early"
            seen += line.startswith(b"data: ")
    else:
        await asyncio.sleep(rng.uniform(FIRST_TOKEN_DELAY, 2.0))
    if rng.random() < 0.5:
        writer.transport.abort()  # a reset, as a crashed client leaves it
    else:
        writer.close()
    return when


def disconnects(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(r'^jaxinfer:request_disconnects_total\{model_name="fake"\} (\S+)$', text, re.M).group(1))


def test_random_hang_ups_are_counted_once_and_aborted(server_and_log):
    front, server, captured = server_and_log
    rng = random.Random(7)

    async def all_clients():
        return await asyncio.gather(*(hang_up(server.port, random.Random(rng.random())) for _ in range(CLIENTS)))

    where = asyncio.run(all_clients())
    assert {"before the first token", "mid-stream", "before the answer"} <= set(where)
    for _ in range(200):  # the server notices each hang-up within a moment
        if disconnects(server.base_url) >= CLIENTS and front.closed_early == front.started:
            break
        time.sleep(0.05)
    assert disconnects(server.base_url) == CLIENTS
    assert front.completed == 0 and front.closed_early == front.started, "an engine request was left running"
    messages = [r for r in captured.records if r.getMessage().startswith("client disconnected")]
    assert len(messages) == CLIENTS and all(r.levelno == logging.INFO for r in messages)
    assert len({r.getMessage() for r in messages}) == CLIENTS, "a request was logged twice"
    bad = [r for r in captured.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [logging.Formatter().format(r) for r in bad]
    # The server still answers normally afterwards.
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ANSWER[:9]
