"""A bounded soak: many concurrent streaming clients (some hanging up early) for a fixed time.

No 5xx, every request that was not cut short completes in full, the engine ends idle with no KV
pages held, and resident memory stays flat after warm-up. CI runs 256 clients for 45 seconds;
the reliability goal's version (256 clients, 5 minutes) runs by hand:

    JAXINFER_LOAD_CLIENTS=256 JAXINFER_LOAD_SECONDS=300 python -m pytest -q tests/test_server_load.py
"""

import asyncio
import collections
import json
import os
import random
import statistics
import threading
import time

import httpx
import psutil
import pytest

from tests.server_fixtures import MODEL_NAME, shared_stack

CLIENTS = int(os.environ.get("JAXINFER_LOAD_CLIENTS", "256"))
SECONDS = float(os.environ.get("JAXINFER_LOAD_SECONDS", "45"))
# Memory is compared from the end of this share of the run. With 256 clients resident memory
# climbs for about 16 s (connections, buffers: measured 354 -> 594 MB) and then stays flat
# (+0.7% over the next 24 s), so the warm-up must outlast that ramp on a loaded machine.
WARMUP_FRACTION = 0.6
HANG_UP_RATE = 0.1  # share of requests whose client disconnects after the first chunk


@pytest.fixture(scope="module")
def stack():
    return shared_stack()


def random_request(rng: random.Random) -> tuple[str, dict]:
    fields = {"model": MODEL_NAME, "max_tokens": rng.randint(4, 40), "temperature": rng.choice([0.0, 0.8]),
              "n": rng.choice([1, 1, 2]), "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    if rng.random() < 0.5:
        words = " ".join(rng.choice(["sea", "sky", "fox", "run", "blue", "café"]) for _ in range(rng.randint(1, 30)))
        return "/v1/completions", {**fields, "prompt": words}
    return "/v1/chat/completions", {**fields, "messages": [{"role": "user", "content": "Tell me about the sea"}]}


async def one_request(client, rng, stats):
    route, body = random_request(rng)
    hang_up = rng.random() < HANG_UP_RATE
    finishes, usage, done = {}, None, False
    async with client.stream("POST", route, json=body) as r:
        stats[f"status {r.status_code}"] += 1
        if r.status_code != 200:
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if hang_up:
                stats["hung up"] += 1
                return  # leaving the block drops the connection mid-stream
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                if c["finish_reason"]:
                    finishes[c["index"]] = c["finish_reason"]
    complete = (done and finishes == {i: "length" for i in range(body["n"])}
                and usage["completion_tokens"] == body["max_tokens"] * body["n"])
    stats["complete" if complete else "incomplete"] += 1


async def soak(url: str, clients: int, seconds: float):
    stats: collections.Counter = collections.Counter()
    rss: list[tuple[float, int]] = []
    process = psutil.Process()
    start = time.monotonic()
    deadline = start + seconds

    async def client_loop(i):
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline:
                await one_request(client, rng, stats)

    def sample_memory():
        # A thread of its own: on a busy event loop (or a loaded machine) an asyncio sampler can
        # miss whole windows of the run.
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - start, process.memory_info().rss))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    sampler.join()
    return stats, rss


def test_concurrent_streaming_clients(stack):
    stats, rss = asyncio.run(soak(stack.url, CLIENTS, SECONDS))
    print(dict(stats))
    assert not [k for k in stats if k.startswith("status") and k != "status 200"], stats
    assert stats["incomplete"] == 0, stats
    # Every client saw at least one request through (finished, or hung up on purpose); requests
    # in flight at the deadline still run to the end.
    assert stats["complete"] + stats["hung up"] >= CLIENTS, stats
    assert stats["hung up"] > 0
    assert stack.wait_idle(timeout=30) == 0.0
    after_warmup = [m for t, m in rss if t >= WARMUP_FRACTION * SECONDS]
    tenth = max(1, len(after_warmup) // 10)
    warm, last = after_warmup[:tenth], after_warmup[-tenth:]
    growth = statistics.median(last) / statistics.median(warm) - 1
    print(f"resident memory growth after warm-up: {growth:+.2%}")
    assert growth < 0.05
