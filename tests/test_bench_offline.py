"""`jaxinfer bench latency | throughput` on a tiny preset, their floors, and the HF peer.

The floors are checked against counts made independently from the model's own state; the
commands run end to end on the CPU and write their records.
"""

import dataclasses
import json
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxinfer.bench.floors import ModelCost
from jaxinfer.bench.hf_peer import run_peer
from jaxinfer.bench.profile import host_profile, profile_steps
from jaxinfer.cli import main
from jaxinfer.config import preset
from jaxinfer.devices import datasheet, measure_ceilings
from jaxinfer.models import create_model


@pytest.mark.parametrize("tied", [False, True])
def test_decode_bytes_and_prefill_flops_match_the_model(tied):
    config = preset("tiny", tie_word_embeddings=tied)
    state = nnx.state(create_model(config))
    nbytes = {jax.tree_util.keystr(p): x.size * 4 for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    embed = next(v for k, v in nbytes.items() if "embed" in k)
    cost = ModelCost(config, 4, 4)
    # A decode step reads every weight but the embedding table (which is the head when tied).
    assert cost.decode_weight_bytes == sum(nbytes.values()) - (0 if tied else embed)
    layers = sum(v for k, v in nbytes.items() if "layers" in k) // 4
    t = 10
    attention = 2 * 2 * config.num_layers * config.num_heads * config.head_dim * t * (t + 1) / 2
    head = 2 * config.vocab_size * config.hidden_size
    norms = config.hidden_size  # the final norm's weights count as parameters, not matmul work
    assert cost.prefill_flops(t) == pytest.approx(2 * (layers + norms) * t + attention + head)
    assert cost.kv_bytes(7) == 2 * config.num_layers * config.num_kv_heads * config.head_dim * 7 * 4


def test_floors_sum_prefill_and_decode_steps():
    cost = ModelCost(preset("tiny"), 2, 2)
    f = cost.generation_floor_s(batch=1, input_len=4, output_len=3, bytes_per_s=1e9, flops_per_s=1e18)
    # Bytes-bound at these rates: the prefill reads the weights once, each of 2 decode steps too.
    assert f["prefill_s"] == pytest.approx(cost.decode_step_bytes(1, 4) / 1e9)
    assert f["decode_s"] == pytest.approx((cost.decode_step_bytes(1, 5) + cost.decode_step_bytes(1, 6)) / 1e9)


def test_ragged_floor_reads_the_kv_of_running_requests_only():
    """Requests of 3 and 1 output tokens: the prefill holds both, the two decode steps only the
    first (bytes-bound rates), by hand from the model's byte counts."""
    cost = ModelCost(preset("tiny"), 2, 2)
    f = cost.ragged_generation_floor_s(input_len=4, output_lens=[3, 1], bytes_per_s=1e9, flops_per_s=1e18)
    w, kv = cost.decode_weight_bytes, cost.kv_bytes
    assert f["prefill_s"] == pytest.approx((w + 2 * kv(4)) / 1e9)
    assert f["decode_s"] == pytest.approx((w + kv(5) + w + kv(6)) / 1e9)


def test_ceilings_and_datasheet_on_the_cpu():
    c = measure_ceilings(repeats=1)
    assert c["bytes_per_s"] >= max(c["copy_bytes_per_s"], c["gemv_read_bytes_per_s"]) > 0
    assert c["matmul_flops_per_s"] > 0
    assert datasheet() is None  # no datasheet row for a CPU: floors use the measured ceilings


def test_ceilings_time_calls_queued_back_to_back(monkeypatch):
    """Each repeat queues `calls` calls and waits once (timing one call at a time added the
    dispatch and the wait to each): a warm-up call, then repeats x calls."""
    from jaxinfer.devices import _seconds_per_call

    seen, waits = [], []
    wait = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: waits.append(x) or wait(x))
    assert _seconds_per_call(lambda x: seen.append(x) or x, 1, repeats=2, calls=3) >= 0
    assert len(seen) == 1 + 2 * 3 and len(waits) == 1 + 2


def test_latency_and_throughput_commands_write_records(tmp_path, capsys):
    common = ["--preset", "tiny", "--input-len", "8", "--output-len", "5", "--num-iters", "1",
              "--output-dir", str(tmp_path), "--compilation-cache-dir", ""]
    assert main(["bench", "latency", *common, "--batch-size", "1,2", "--profile"]) == 0
    [path] = tmp_path.glob("bench_latency_tiny_*.json")
    record = json.loads(path.read_text())
    assert record["device"] and record["jax"] == jax.__version__ and record["command"].startswith("jaxinfer bench")
    rows = record["results"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["decode_tokens_per_s"] > 0 and 0 < r["decode_fraction_of_measured_floor"]
        assert sum(run["generated_tokens"] for run in r["runs"]) == r["batch_size"] * 5
        assert r["profile"]["steps"] == 16 and r["profile"]["wall_s_per_step"] > 0
        host = r["profile"]["host"]
        assert 0 < host["host_ms_per_step"] <= host["wall_ms_per_step"] + 1e-6
        assert any("step" in f["function"] for f in host["top_functions_profiled"])
    assert path.with_suffix(".md").read_text().count("\n| ") >= 3
    assert main(["bench", "throughput", *common, "--num-prompts", "6", "--profile"]) == 0
    [path] = tmp_path.glob("bench_throughput_tiny_*.json")
    result = json.loads(path.read_text())["result"]
    assert result["runs"][0]["generated_tokens"] == 6 * 5 and result["output_tokens_per_s"] > 0
    assert result["profile_of_one_run"]["steps"] == 1 and result["profile_of_one_run"]["wall_s_per_step"] > 0


def test_profile_counts_steps():
    calls = []
    out = profile_steps(lambda: calls.append(np.ones(4).sum()), 3)
    assert len(calls) == 3 and out["steps"] == 3 and out["wall_s_per_step"] > 0


def test_host_profile_separates_the_wait_for_the_device():
    from jaxinfer.engine.runner import PendingStep

    def step():
        time.sleep(0.002)  # the host's own work
        PendingStep().result()

    out = host_profile(step, 4)
    assert out["steps"] == 4 and out["host_ms_per_step"] >= 2 and out["wait_ms_per_step"] >= 0
    assert out["wall_ms_per_step"] >= out["host_ms_per_step"]


def test_hf_peer_runs_the_same_preset_on_the_cpu():
    config = preset("tiny")
    spec = {"mode": "latency", "prompts": [[5, 6, 7, 8]], "output_len": 4, "num_iters": 1, "device": "cpu",
            "dtype": "float32", "preset_config": dataclasses.asdict(config)}
    result = run_peer(spec, timeout_s=300)
    assert "error" not in result, result
    assert result["name"] == "hf_transformers" and result["ttft_s"] > 0 and result["decode_tokens_per_s"] > 0


def test_structured_command_writes_a_record(tmp_path):
    """`bench structured` on the tiny preset with a byte-level tokenizer of its 256 ids: every
    constrained output parses, and the unconstrained run makes as many tokens."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert main(["bench", "structured", "--preset", "tiny", "--tokenizer", str(tmp_path / "tokenizer.json"),
                 "--batch-size", "2", "--input-len", "8", "--max-tokens", "160", "--max-string-len", "4",
                 "--output-dir", str(tmp_path), "--compilation-cache-dir", "", "--profile"]) == 0
    [path] = tmp_path.glob("bench_structured_tiny_*.json")
    result = json.loads(path.read_text())["result"]
    assert result["valid_json"] == 2 and result["truncated"] == 0 and result["grammar_compiles"] == 2
    assert result["structured_output_tokens_per_s"] > 0 and result["unconstrained_output_tokens_per_s"] > 0
    assert result["structured_steps"] >= result["max_output_len"] and result["mask_steps"] > 0
    for run in ("structured", "unconstrained"):
        assert result[f"{run}_host_ms_per_step"] > 0 and result[f"{run}_wait_ms_per_step"] >= 0
        assert 0 < result[f"{run}_fraction_of_measured_floor"] == pytest.approx(
            result["floor_s"]["measured"] / result[f"{run}_seconds"])
        first, median = result[f"{run}_first_steps_ms"], result[f"{run}_median_step_ms"]
        assert len(first) == min(6, result[f"{run}_steps"]) and min(first) > 0 and median > 0
    timelines = result["profile"]["host_timeline"]
    structured, plain = timelines["structured"]["calls"], timelines["unconstrained"]["calls"]
    assert structured["StructuredOutputs.fill_bitmask"] > 0 and "StructuredOutputs.fill_bitmask" not in plain
    assert structured["LLMEngine.step"] > 0 and plain["ModelRunner.dispatch"] > 0


def test_host_timeline_records_calls_and_restores_methods():
    from jaxinfer.bench.profile import HostTimeline

    class Worker:
        def work(self, seconds):
            time.sleep(seconds)
            return seconds

    original = Worker.work
    with HostTimeline([(Worker, "work")]) as timeline:
        assert Worker().work(0.01) == 0.01 and Worker().work(0.02) == 0.02
    assert Worker.work is original
    assert timeline.summary()["calls"] == {"Worker.work": 2}
    assert 0.03 <= timeline.seconds() < 0.5


def test_startup_phases_split_the_time_to_the_first_token():
    from jaxinfer.bench.offline import _startup_phases

    # Marks as `bench startup` reads them: seconds since the child started, plus the engine's own split.
    marks = {"imports": 1.0, "weights": 4.0, "engine": 10.0, "engine_compile": 4.5, "engine_first_runs": 1.0}
    phases = _startup_phases(marks, first=10.25)
    assert phases == {"imports": 1.0, "weights": 3.0, "compile": 4.5, "first_runs": 1.0, "engine_other": 0.5,
                      "first_request": 0.25}
    assert sum(phases.values()) == pytest.approx(10.25)


def test_run_header_names_xla_flags_in_the_command(monkeypatch):
    """A record made under XLA_FLAGS says so in its command (the flags change what is measured)."""
    from jaxinfer.bench.offline import run_header

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert run_header(["bench", "latency"])["command"] == "jaxinfer bench latency"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0 --xla_dump_to=/tmp/a b")
    assert (run_header(["bench", "latency"])["command"]
            == "XLA_FLAGS='--xla_gpu_autotune_level=0 --xla_dump_to=/tmp/a b' jaxinfer bench latency")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    assert (run_header(["bench", "latency"])["command"] == "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "
            "XLA_FLAGS='--xla_gpu_autotune_level=0 --xla_dump_to=/tmp/a b' jaxinfer bench latency")


def test_moe_floor_reads_only_routed_experts():
    """Batch 1 reads k of X experts a layer; a batch of B, each expert with probability
    1 - (1 - k/X)^B; a token computes through k experts. Expert bytes counted off the state."""
    from jaxinfer.bench.floors import stored_expert_bytes

    config = preset("tiny-moe")
    state = nnx.state(create_model(config))
    flat = {jax.tree_util.keystr(p): x.size * 4 for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    experts = sum(v for key, v in flat.items() if "w_expert" in key)
    assert stored_expert_bytes(config, state) == experts
    cost = ModelCost(config, 4, 4)
    assert cost.expert_weight_bytes == experts
    x, k = config.num_experts, config.num_experts_per_tok
    assert cost.decode_weight_bytes_at(1) == pytest.approx(cost.decode_weight_bytes - experts * (1 - k / x))
    assert cost.decode_weight_bytes_at(3) == pytest.approx(cost.decode_weight_bytes - experts * (1 - k / x) ** 3)
    assert cost.decode_weight_bytes_at(10_000) == pytest.approx(cost.decode_weight_bytes)
    dense = ModelCost(preset("tiny"), 4, 4)
    assert dense.decode_weight_bytes_at(1) == dense.decode_weight_bytes and dense.expert_weight_bytes == 0
    # Matmul work per token: every layer weight but the unrouted experts' (norms included, as in
    # the dense count), plus nothing for the embedding and head.
    layers = sum(v for key, v in flat.items() if "layers" in key) // 4
    unrouted = experts // 4 * (x - k) // x
    assert cost.matmul_flops_per_token == pytest.approx(2 * (layers - unrouted + config.hidden_size))


def test_moe_records_carry_the_weight_bytes_by_batch():
    from jaxinfer.bench.offline import weight_bytes_fields

    moe = weight_bytes_fields(ModelCost(preset("tiny-moe"), 2, 2), [1, 4])
    by_batch = moe["weight_bytes_per_decode_step_by_batch"]
    assert by_batch[1] < by_batch[4] < moe["weight_bytes_per_decode_step"]
    assert "weight_bytes_per_decode_step_by_batch" not in weight_bytes_fields(ModelCost(preset("tiny"), 2, 2), [1])


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b"])  # (llama: the peer test above)
def test_hf_peer_builds_each_preset_at_its_size(name):
    import torch
    import transformers

    from jaxinfer.bench.hf_peer import _preset_hf_config

    config = preset(name)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            _preset_hf_config(dataclasses.asdict(config), transformers), dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
