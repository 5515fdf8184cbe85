"""Disconnects abort their requests and free their KV pages; shutdown drains in-flight streams."""

import json
import threading
import time

import httpx
import pytest

from jaxinfer.server import ServerSettings, create_app
from tests.server_fixtures import MODEL_NAME, LiveServer, shared_stack

LONG = 240  # tokens: far more than a request generates in the moment a disconnect takes to land


@pytest.fixture(scope="module")
def stack():
    return shared_stack()


def generated_tokens(stack) -> int:
    return stack.on_engine(lambda e: e.metrics.snapshot().generation_tokens_total)


def long_request(stream: bool, **fields):
    return {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True, "stream": stream, **fields}


@pytest.mark.parametrize("fields", [{}, {"prompt": ["a", "b c"], "n": 2}], ids=["one", "two-prompts-n2"])
def test_disconnect_mid_stream_aborts_and_frees_pages(stack, fields):
    before = generated_tokens(stack)
    body = long_request(True, **fields)
    choices = 2 * fields.get("n", 1) if "n" in fields else 1
    with httpx.Client(base_url=stack.url) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            seen = [line for line, _ in zip(lines, range(4))]
            assert all(line.startswith("data: {") or not line for line in seen)
            busy = stack.on_engine(lambda e: (e.num_unfinished_requests, e.block_manager.usage))
            assert busy[0] >= 1 and busy[1] > 0
        # Leaving the block closes the connection halfway through the stream.
    assert stack.wait_idle(timeout=5) == 0.0
    assert generated_tokens(stack) - before < choices * LONG, "the request ran to the end after the disconnect"


def test_disconnect_before_an_unstreamed_answer_aborts(stack):
    before = generated_tokens(stack)
    with httpx.Client(base_url=stack.url, timeout=httpx.Timeout(5.0, read=0.15)) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=long_request(False, n=4))
    assert stack.wait_idle(timeout=5) == 0.0
    assert generated_tokens(stack) - before < 4 * LONG


def test_shutdown_drains_in_flight_streams(stack):
    app = create_app(stack.front, ServerSettings(served_model_names=(MODEL_NAME,)))
    server = LiveServer(app).start()
    body = long_request(True, max_tokens=120, stream_options={"include_usage": True})
    events = []
    first_chunk = threading.Event()

    def consume():
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_chunk.set()

    client = threading.Thread(target=consume)
    client.start()
    assert first_chunk.wait(10)
    server.server.should_exit = True  # what SIGTERM does: stop accepting, then wait for open requests
    deadline = time.monotonic() + 10
    while True:  # the listening socket closes first
        try:
            httpx.get(server.base_url + "/health", timeout=2)
        except httpx.ConnectError:
            break
        assert time.monotonic() < deadline, "still accepting connections after shutdown began"
        time.sleep(0.05)
    client.join(30)
    server.thread.join(30)
    assert not server.thread.is_alive()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 120
    finish = [c["finish_reason"] for e in events[:-2] for c in json.loads(e)["choices"]]
    assert finish[-1] == "length"
    assert stack.wait_idle() == 0.0
