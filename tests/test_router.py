"""jaxinfer replicas behind an existing router (sglang-router, from the package index): the
openai client is served through it, requests reach both replicas, and a replica taken down is
routed around without a failed request."""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from tests.server_fixtures import LiveServer, free_port, make_engine, write_checkpoint


def _replica(checkpoint):
    from jaxinfer.engine.async_engine import AsyncLLMEngine
    from jaxinfer.server import ServerSettings, create_app

    front = AsyncLLMEngine(make_engine(checkpoint, warmup=False))
    return front, LiveServer(create_app(front, ServerSettings(served_model_names=("tiny",)))).start()


def _served(front) -> int:
    return sum(front.engine.metrics.request_success_total.values())


def test_replicas_behind_sglang_router_survive_one_going_down():
    checkpoint = write_checkpoint(Path(tempfile.mkdtemp(prefix="jaxinfer-router-test-")) / "tiny")
    replicas = [_replica(checkpoint) for _ in range(2)]
    port = free_port()
    router = subprocess.Popen(
        [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
         "--prometheus-port", str(free_port()), "--policy", "round_robin", "--log-level", "warn",
         "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
         "--worker-urls", *(server.base_url for _, server in replicas)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert router.poll() is None, router.stderr.read()
            assert time.monotonic() < deadline, "the router did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(i):
            out = client.completions.create(model="tiny", prompt=f"The quick brown fox {i}", max_tokens=4,
                                            temperature=0.0)
            assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1
            chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Hi {i}"}],
                                                  max_tokens=4, temperature=0.0)
            assert chat.choices[0].message.role == "assistant"

        # What the router's metadata discovery reads from each worker.
        facts = httpx.get(replicas[0][1].base_url + "/server_info").json()
        assert (facts["served_model_name"], facts["tp_size"], facts["dp_size"]) == ("tiny", 1, 1)
        assert httpx.get(replicas[0][1].base_url + "/get_model_info").json()["is_generation"] is True
        for i in range(4):
            ask(i)
        assert all(_served(front) > 0 for front, _ in replicas), [_served(f) for f, _ in replicas]
        # One replica goes down; the router notices (health checks, retries) and the rest go to the other.
        survivor, (gone_front, gone_server) = replicas[0], replicas[1]
        gone_server.stop()
        before = _served(survivor[0])
        for i in range(4, 8):
            ask(i)
        assert _served(survivor[0]) - before == 8
    finally:
        router.terminate()
        router.wait(10)
        log = router.stderr.read()
        for front, server in replicas:
            server.stop()
            front.shutdown()
    assert "model unknown" not in log, log[-2000:]  # discovery found the model each worker serves
