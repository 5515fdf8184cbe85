"""`jaxinfer bench verify-cost` on a tiny preset: every (batch, k) point is timed against the
engine without speculation, and the expected speedup follows from the accepted lengths given.
Forced proposals are wrong on purpose, so every step verifies exactly k per request."""

import json

from jaxinfer.cli import main


def test_verify_cost_command_writes_its_record(tmp_path):
    argv = ["bench", "verify-cost", "--preset", "tiny", "--batch-size", "1,2", "--num-tokens", "0,2",
            "--num-steps", "3", "--input-len", "8", "--accepted", "2:1.5", "--max-num-batched-tokens", "32",
            "--output-dir", str(tmp_path),
            "--compilation-cache-dir", ""]
    assert main(argv) == 0
    [path] = tmp_path.glob("bench_verify_cost_tiny_*.json")
    record = json.loads(path.read_text())
    rows = record["results"]
    assert [(r["batch_size"], r["num_speculative_tokens"]) for r in rows] == [(1, 0), (1, 2), (2, 0), (2, 2)]
    for r in rows:
        assert r["step_ms"] > 0 and r["baseline_step_ms"] > 0
        assert r["cost_vs_baseline"] == r["step_ms"] / r["baseline_step_ms"]
        if r["num_speculative_tokens"] == 2:
            assert r["expected_speedup"] == 1.5 * r["baseline_step_ms"] / r["step_ms"]
        else:
            assert "expected_speedup" not in r
    assert (tmp_path / path.name.replace(".json", ".md")).exists()


def test_forced_proposals_verify_k_tokens_a_step():
    """The benchmark's forced proposer makes every decoding request verify k tokens a step, and
    none is accepted: one token a step, as the cost measurement assumes."""
    from jaxinfer.bench.speculative import _forced_proposals
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import LLMEngine
    from jaxinfer.sampling_params import SamplingParams
    from tests.engine_fixtures import tiny_model

    engine = LLMEngine(tiny_model(), EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
                                                  num_pages=64, page_size=4, compilation_cache_dir="", warmup=False,
                                                  speculative_config={"method": "ngram", "adaptive": False,
                                                                      "num_speculative_tokens": 3}))
    _forced_proposals(engine, 3)
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0.0, max_tokens=10,
                                                                            ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    m = engine.metrics
    assert m.spec_decode_num_drafts_total >= 5
    assert m.spec_decode_num_draft_tokens_total >= 3 * 5


def test_speculative_command_writes_its_record(tmp_path):
    """`bench speculative` on a tiny chat checkpoint: both engines run every round, the record
    carries acceptance counters and the speedup is the ratio of the medians' rates."""
    from tests.server_fixtures import write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "ckpt")
    argv = ["bench", "speculative", "--model", str(checkpoint), "--workload", "chat", "--batch-size", "2",
            "--num-rounds", "1", "--num-iters", "2", "--output-len", "6", "--max-model-len", "256",
            "--num-pages", "64", "--max-num-batched-tokens", "64", "--page-size", "8",
            "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1}',
            "--output-dir", str(tmp_path / "out"), "--compilation-cache-dir", ""]
    assert main(argv) == 0
    [path] = (tmp_path / "out").glob("bench_speculative_*.json")
    [row] = json.loads(path.read_text())["results"]
    assert (row["workload"], row["batch_size"]) == ("chat", 2)
    for name in ("off", "on"):
        assert len(row[name]["runs_seconds"]) == 2 and 0 < row[name]["output_tokens"] <= 2 * 6
    assert row["speedup"] == row["on"]["output_tokens_per_s"] / row["off"]["output_tokens_per_s"]
    assert row["on"]["draft_tokens"] >= row["on"]["accepted_tokens"] >= 0
    assert 0 <= row["identical_outputs"] <= 2
