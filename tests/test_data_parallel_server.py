"""`jaxinfer serve --data-parallel-size 2 --tensor-parallel-size 2` (engine/data_parallel.py behind
the unchanged server): it answers as one engine does, /metrics reports both replicas as one, and
aborts reach the replica that holds the request. The server runs on 8 simulated CPU devices in a
subprocess; the one-engine reference, the same command without the flag, runs in this process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from jaxinfer.engine.metrics import EngineMetrics, Histogram, merge_metrics
from tests.server_fixtures import MODEL_NAME, free_port, live_server, write_checkpoint
from tests.test_data_parallel import ROOT, eight_device_env
from tests.test_server_metrics import scrape, value

# Few, small buckets: warm-up compiles every one, on each replica.
SERVE_SMALL = ["--max-model-len", "128", "--max-num-seqs", "1", "--max-num-batched-tokens", "4", "--page-size", "8",
               "--num-pages", "48", "--compilation-cache-dir", ""]
PROMPTS = ["The quick brown fox", "Paris is the capital", "Once upon a time", "Streaming responses arrive",
           "Numbers like 1234", "Unicode text:"]
CHAT = [{"role": "user", "content": "Name a capital city."}]


# -- in-process ---------------------------------------------------------------------------------
def test_merge_metrics_sums_counters_and_merges_histograms():
    a, b = EngineMetrics(), EngineMetrics()
    a.record_step(num_prompt_tokens=5, num_generation_tokens=2, num_running=2, num_waiting=1, kv_usage=0.5,
                  num_preemptions_total=1, ttfts=[0.003], itls=[0.02, 0.2])
    b.record_step(num_prompt_tokens=7, num_generation_tokens=3, num_running=1, num_waiting=0, kv_usage=0.25,
                  num_preemptions_total=0, ttfts=[0.5], itls=[])
    a.record_finished("stop", 1.0)
    b.record_finished("stop", 2.0)
    b.record_finished("abort", 0.1)
    a.record_spec_decode(3, 2)
    b.record_spec_decode(1, 1)
    m = merge_metrics([a.snapshot(), b.snapshot()])
    assert (m.prompt_tokens_total, m.generation_tokens_total, m.num_preemptions_total) == (12, 5, 1)
    assert (m.num_requests_running, m.num_requests_waiting, m.kv_cache_usage_perc) == (3, 1, 0.375)
    assert m.request_success_total == {"abort": 1, "stop": 2}
    assert m.spec_decode_num_accepted_tokens_per_pos_total == [2, 1, 0]
    ttft = m.time_to_first_token_seconds
    assert ttft.count == 2 and ttft.total == pytest.approx(0.503)
    assert [c for _, c in ttft.cumulative()] == [
        c1 + c2 for (_, c1), (_, c2) in zip(a.time_to_first_token_seconds.cumulative(),
                                            b.time_to_first_token_seconds.cumulative())]
    assert m.inter_token_latency_seconds.count == 2 and m.iteration_tokens_total.count == 2
    with pytest.raises(ValueError, match="same bucket bounds"):
        Histogram.merged([Histogram((1.0,)), Histogram((2.0,))])


def test_serve_and_batch_take_the_flag(tmp_path):
    from jaxinfer.cli import build_parser, engine_config_kwargs, main

    for command in (["serve"], ["batch", "-i", "in.jsonl", "-o", "out.jsonl"]):
        args = build_parser().parse_args([*command, "--data-parallel-size", "2", "--tensor-parallel-size", "2"])
        assert engine_config_kwargs(args)["data_parallel_size"] == 2
    # Refused before the model is even looked for, as generate refuses it.
    with pytest.raises(SystemExit, match=r"dp=2 x tp=4 needs 8 devices"):
        main(["serve", "--model", str(tmp_path / "missing"), *SERVE_SMALL, "--data-parallel-size", "2",
              "--tensor-parallel-size", "4", "--port", str(free_port()), "--log-level", "warning"])


# -- `jaxinfer serve` on 8 simulated devices ----------------------------------------------------
def _serve_main(checkpoint: str, port: int):
    """Runs in the subprocess: `jaxinfer serve` with dp 2 x tp 2 until SIGTERM, then prints each
    replica's devices and counts for the caller to check /metrics against."""
    import jax

    import jaxinfer.cli as cli

    made = []
    build = cli.engine_for_serving

    def keep(args):  # cmd_serve looks the function up when it runs
        made.append(build(args))
        return made[-1]

    cli.engine_for_serving = keep
    # uvicorn drains on SIGTERM, then raises it again under the handler it found: let that one
    # return, so the replicas can be read after `serve` returns.
    signal.signal(signal.SIGTERM, lambda *_: None)
    rc = cli.main(["serve", "--model", checkpoint, "--served-model-name", MODEL_NAME, "--port", str(port),
                   "--log-level", "warning", *SERVE_SMALL, "--data-parallel-size", "2", "--tensor-parallel-size", "2"])
    replicas = [{"devices": sorted(d.id for d in jax.tree.leaves(r.runner.params)[0].devices()),
                 "requests": sum(r.metrics.request_success_total.values()),
                 "generation_tokens": r.metrics.generation_tokens_total} for r in made[0].replicas]
    print("REPLICAS", json.dumps(replicas), flush=True)
    sys.exit(rc)


def _wait_healthy(proc: subprocess.Popen, url: str, log_path, timeout: float = 150.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-8000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the data-parallel server did not start:\n" + log_path.read_text()[-8000:])


def _answers(url: str) -> dict:
    """Concurrent greedy completions (one of them with two prompts, one with n=2) and a chat."""
    def completion(prompt, **extra):
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        single = [pool.submit(completion, p) for p in PROMPTS]
        several = pool.submit(completion, PROMPTS[:2])
        n2 = pool.submit(completion, PROMPTS[2], n=2)
        chat = pool.submit(httpx.post, url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL_NAME, "messages": CHAT, "max_tokens": 8, "temperature": 0})
        bodies = [f.result() for f in [*single, several, n2]]
        assert chat.result().status_code == 200, chat.result().text
        chat_body = chat.result().json()
    return {"texts": [[c["text"] for c in b["choices"]] for b in bodies],
            "chat": chat_body["choices"][0]["message"]["content"],
            "completion_tokens": sum(b["usage"]["completion_tokens"] for b in [*bodies, chat_body])}


def _disconnect_early(url: str) -> None:
    """A streamed completion whose client goes away after the first chunk (the server aborts it)."""
    with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
            "model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 100, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        next(r.iter_lines())


def _idle_metrics(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        idle = all(value(samples, f"vllm:{g}") == 0 for g in ("num_requests_running", "num_requests_waiting",
                                                                "kv_cache_usage_perc"))
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@contextlib.contextmanager
def _one_engine_server(checkpoint):
    """`jaxinfer serve`'s engine with the same flags but one replica, on this process's one device,
    served on loopback."""
    from jaxinfer.cli import build_parser, engine_for_serving
    from jaxinfer.engine.async_engine import AsyncLLMEngine
    from jaxinfer.server import ServerSettings, create_app

    args = build_parser().parse_args(["serve", "--model", str(checkpoint), *SERVE_SMALL])
    front = AsyncLLMEngine(engine_for_serving(args))
    try:
        with live_server(create_app(front, ServerSettings(served_model_names=(MODEL_NAME,)))) as server:
            yield server
    finally:
        front.shutdown()


def test_data_parallel_server_answers_as_one_engine(tmp_path):
    checkpoint = write_checkpoint(tmp_path / MODEL_NAME)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", f"from tests.test_data_parallel_server import _serve_main; "
                                   f"_serve_main({str(checkpoint)!r}, {port})"],
            cwd=ROOT, env=eight_device_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        with _one_engine_server(checkpoint) as reference:  # built while the subprocess starts
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(proc, url, log_path)
            before = scrape(url)
            got = _answers(url)
            assert got == _answers(reference.base_url)
        _disconnect_early(url)
        after = _idle_metrics(url)  # the abort reached the replica holding the request: nothing left running
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    out = log_path.read_text()
    assert proc.returncode == 0, out[-8000:]
    [replicas] = [json.loads(line[len("REPLICAS "):]) for line in out.splitlines() if line.startswith("REPLICAS ")]
    # Each replica on its own two devices, and each got requests.
    assert [r["devices"] for r in replicas] == [[0, 1], [2, 3]]
    assert all(r["requests"] > 0 for r in replicas), replicas
    # /metrics reports the replicas' sums as one engine's series.
    for prefix in ("vllm", "jaxinfer"):
        assert value(before, f"{prefix}:generation_tokens_total") == 0
        generated = value(after, f"{prefix}:generation_tokens_total")
        assert generated == sum(r["generation_tokens"] for r in replicas) >= got["completion_tokens"]
        finished = {reason: value(after, f"{prefix}:request_success_total", finished_reason=reason)
                    for reason in ("stop", "length", "abort")}
        assert sum(finished.values()) == sum(r["requests"] for r in replicas)
        assert finished["abort"] == 1
        assert value(after, f"{prefix}:e2e_request_latency_seconds_count") == sum(r["requests"] for r in replicas)
