"""`jaxinfer bench prefix` on a tiny preset: the record holds each TTFT case with the cache hits it
claims (cold: none; device hit: the prefix from the device pool; host hit: from the host tier),
and throughput with caching on and off at each hit rate."""

import json

import pytest

from jaxinfer.cli import build_parser, engine_config_kwargs, main
from jaxinfer.engine.config import EngineConfig


def test_prefix_command_writes_its_record(tmp_path):
    argv = ["bench", "prefix", "--preset", "tiny", "--prefix-len", "32", "--new-len", "8", "--hit-rates", "0,0.5",
            "--num-prompts", "4", "--input-len", "24", "--output-len", "3", "--num-iters", "1", "--page-size", "4",
            "--max-num-batched-tokens", "64", "--output-dir", str(tmp_path), "--compilation-cache-dir", ""]
    assert main(argv) == 0
    [path] = tmp_path.glob("bench_prefix_tiny_*.json")
    record = json.loads(path.read_text())
    [run] = record["ttft"]["runs"]
    assert (run["cold"]["device_hit_tokens"], run["cold"]["host_hit_tokens"]) == (0, 0)
    assert (run["device_hit"]["device_hit_tokens"], run["device_hit"]["host_hit_tokens"]) == (32, 0)
    assert (run["host_hit"]["device_hit_tokens"], run["host_hit"]["host_hit_tokens"]) == (0, 32)
    rows = record["throughput"]
    assert [r["hit_rate"] for r in rows] == [0, 0.5]
    for row in rows:
        assert row["off"]["device_hit_tokens"] == row["off"]["query_tokens"] == 0
        assert row["on"]["seconds"] > 0 and row["off"]["seconds"] > 0 and row["host_tier"]["seconds"] > 0
        # The device-only engine never touches a host tier.
        assert row["on"]["pages_offloaded"] == row["on"]["pages_reloaded"] == 0
    # Half of each prompt (12 of 24 tokens: 3 pages) is the primed shared prefix.
    for mode in ("on", "host_tier"):
        assert rows[1][mode]["device_hit_tokens"] == 4 * 12 and rows[0][mode]["device_hit_tokens"] == 0


@pytest.mark.parametrize("argv, expected", [
    ([], (True, None)),
    (["--no-enable-prefix-caching"], (False, None)),
    (["--enable-prefix-caching", "--kv-offloading-size", "2.5"], (True, 2.5)),
])
def test_prefix_caching_flags_reach_the_engine_config(argv, expected):
    config = EngineConfig(**engine_config_kwargs(build_parser().parse_args(["generate", *argv])))
    assert (config.enable_prefix_caching, config.kv_offloading_size) == expected


def test_bad_hit_rates_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="hit-rates"):
        main(["bench", "prefix", "--preset", "tiny", "--hit-rates", "0.5,1", "--output-dir", str(tmp_path)])
