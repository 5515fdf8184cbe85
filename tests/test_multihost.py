"""Multi-process runs (jaxinfer/distributed.py): two CLI processes on loopback, one CPU device
each, form one JAX distributed system whose tp=2 mesh spans both, and generate the tokens one
process with two simulated devices does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from jaxinfer.cli import main
from jaxinfer.distributed import initialize
from tests.test_data_parallel import CLI_SMALL, PROMPTS, ROOT


def test_nothing_given_starts_nothing_and_bad_settings_are_refused(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert initialize() is False
    with pytest.raises(ValueError, match="process-id"):
        initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="num-processes"):
        initialize("127.0.0.1:1234", 0, 0)
    with pytest.raises(ValueError, match="host:port"):
        initialize("127.0.0.1", 2, 0)
    with pytest.raises(SystemExit, match="process-id"):
        main(["generate", "--coordinator-address", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "-1"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip(), "PYTHONUNBUFFERED": "1"}


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_two_processes_generate_what_one_process_does(tmp_path):
    from tests.server_fixtures import write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "ckpt", seed=3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS) + "Paris is\n")
    command = [sys.executable, "-m", "jaxinfer.cli", "generate", "--model", str(checkpoint), *CLI_SMALL,
               "--prompts-file", str(prompts), "--max-tokens", "8", "--json", "--tensor-parallel-size", "2"]
    address = f"127.0.0.1:{_free_port()}"
    # All three at once: the two halves of the distributed run, and the one-process reference.
    procs = [subprocess.Popen(command + ["--coordinator-address", address, "--num-processes", "2", "--process-id",
                                         str(i)], cwd=ROOT, env=_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    procs.append(subprocess.Popen(command, cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, out[-2000:] + err[-6000:]
    first, second, single = (_records(out) for out, _ in results)
    assert len(single) == len(PROMPTS) + 1 and [r["prompt_token_ids"] for r in single[:-1]] == PROMPTS
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in single]
    assert [r["text"] for r in first] == [r["text"] for r in single]
    assert second == []  # every process computed the outputs; process 0 alone prints them
