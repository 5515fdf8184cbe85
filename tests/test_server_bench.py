"""`jaxinfer bench serve` against the live test server, its arrival processes and goodput, and
`jaxinfer serve` as a real process: API key from the environment, SIGTERM drains, then exits."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from jaxinfer.cli import main as jaxinfer_main
from jaxinfer.server.bench import BenchConfig, arrival_gaps, make_requests, parse_goodput, run_benchmark
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
