"""Data parallelism (engine/data_parallel.py): replicas on their own devices give the outputs of
one engine. The runs need 8 simulated CPU devices, so they happen in a subprocess (this process
started JAX with one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.data_parallel import replica_devices, replica_seed
from jaxinfer.engine.engine import LLMEngine

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_pages=96, max_num_batched_tokens=32, max_num_seqs=4, page_size=8, max_model_len=128,
             compilation_cache_dir="", warmup=False)
CLI_SMALL = ["--num-pages", "96", "--max-num-batched-tokens", "32", "--max-num-seqs", "4", "--page-size", "8",
             "--max-model-len", "128", "--compilation-cache-dir", ""]
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [20, 21], [30, 31, 32, 33, 34, 35], [40]]


def eight_device_env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()}


def run_in_subprocess(code: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=eight_device_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc.stdout


# -- in-process: settings the devices cannot serve ----------------------------------------------
def test_bad_sizes_are_refused():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="data_parallel_size"):
            EngineConfig(data_parallel_size=bad)
    with pytest.raises(ValueError, match=r"dp=2 x tp=1 needs 2 devices, but only 1"):
        replica_devices(EngineConfig(data_parallel_size=2))
    with pytest.raises(ValueError, match="runs on 1 device"):
        LLMEngine._place_on_mesh(None, 1, devices=jax.devices() * 2)  # refused before the model is read
    assert replica_devices(EngineConfig()) == [jax.devices()[:1]]


def test_replica_seeds_differ_and_replica_0_keeps_the_configured_one():
    seeds = [replica_seed(7, i) for i in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4 and replica_seed(7, 1) == seeds[1]


def test_cli_refuses_more_devices_than_visible(tmp_path):
    from jaxinfer.cli import main

    # Refused before the model is even looked for.
    with pytest.raises(SystemExit, match=r"dp=2 x tp=4 needs 8 devices"):
        main(["generate", "--model", str(tmp_path / "missing"), *CLI_SMALL, "--data-parallel-size", "2",
              "--tensor-parallel-size", "4"])


# -- on 8 simulated devices -----------------------------------------------------------------------
def _check_placement(engine, tp: int):
    """Replica i's parameters and KV pools live on devices i * tp .. (i + 1) * tp - 1 alone, the
    parameters split over them by the rules table."""
    from jaxinfer.models.llama import param_value

    for i, replica in enumerate(engine.replicas):
        mine = set(jax.devices()[i * tp:(i + 1) * tp])
        for leaf in jax.tree.leaves(replica.runner.params):
            assert leaf.devices() == mine, (tp, i, leaf.devices())
        for pool in replica.runner.kv_cache:
            assert pool.devices() == mine, (tp, i, pool.devices())
        w_o = param_value(replica.runner.params["layers"]["w_o"])  # [L, N, H, D]: 4 heads over tp
        assert {s.data.shape[1] for s in w_o.addressable_shards} == {4 // tp}


def _dp_main(checkpoint: str, prompts_file: str):
    """Runs in the subprocess: one engine on one device, then LLM with dp 2 x tp 1 and the CLI
    with dp 2 x tp 4; prints the one engine's tokens for the caller to compare the CLI's with."""
    from jaxinfer import LLM, SamplingParams
    from jaxinfer.cli import main
    from jaxinfer.engine.data_parallel import DataParallelEngine

    assert jax.device_count() == 8
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    want = [o.outputs[0].token_ids for o in LLM(checkpoint, **SMALL).generate(prompts, greedy, use_tqdm=False)]
    print("WANT", json.dumps(want), flush=True)

    llm = LLM(checkpoint, data_parallel_size=2, **SMALL)
    engine = llm.engine
    assert isinstance(engine, DataParallelEngine) and len(engine.replicas) == 2
    # Routing: each new request goes to the replica with the fewest unfinished ones.
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy)
    assert [r.num_unfinished_requests for r in engine.replicas] == [3, 3]
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("r0", prompts[0], greedy)
    engine.abort_request(["r0", "r1"])  # one on each replica
    assert [r.num_unfinished_requests for r in engine.replicas] == [2, 2]
    engine.abort_request([f"r{i}" for i in range(2, 6)])
    assert not engine.has_unfinished_requests()
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert got == want, (got, want)
    _check_placement(engine, 1)
    print("dp=2 tp=1 ok", flush=True)

    made = []  # the CLI's engine, kept for the placement checks
    build = DataParallelEngine.__init__

    def keep(self, *args, **kwargs):
        build(self, *args, **kwargs)
        made.append(self)

    DataParallelEngine.__init__ = keep
    main(["generate", "--model", checkpoint, *CLI_SMALL, "--data-parallel-size", "2", "--tensor-parallel-size", "4",
          "--prompts-file", prompts_file, "--max-tokens", "8", "--json"])
    _check_placement(made[0], 4)
    print("dp=2 tp=4 ok", flush=True)


def test_replicas_match_one_engine_and_stay_on_their_devices(tmp_path):
    from tests.server_fixtures import write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "ckpt", seed=3)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS))
    out = run_in_subprocess(f"from tests.test_data_parallel import _dp_main; "
                            f"_dp_main({str(checkpoint)!r}, {str(prompts_file)!r})")
    lines = out.splitlines()
    assert "dp=2 tp=1 ok" in lines and "dp=2 tp=4 ok" in lines, out
    [want] = [json.loads(line[len("WANT "):]) for line in lines if line.startswith("WANT ")]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    # The CLI's dp x tp run gives the one-engine tokens the LLM runs were checked against.
    assert [r["prompt_token_ids"] for r in records] == PROMPTS
    assert [r["token_ids"] for r in records] == want
