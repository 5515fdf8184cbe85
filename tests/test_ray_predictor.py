"""`jaxinfer.ray.LLMPredictor` under Ray Data's `map_batches` on a local Ray instance: an actor's
engine replica gives what the offline `LLM.generate` gives in this process."""

import subprocess
import sys

import numpy as np
import pytest

from jaxinfer.ray import OUTPUT_COLUMNS, LLMPredictor
from jaxinfer.sampling_params import SamplingParams
from tests.server_fixtures import write_checkpoint

ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, page_size=8, num_pages=96,
              compilation_cache_dir="", warmup=False)
PROMPTS = ["The quick brown fox", "Paris is the capital", "Once upon a time", "Numbers like 1234", "Berlin is"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ray_ckpt") / "tiny", seed=5)


@pytest.fixture(scope="module")
def local(checkpoint):
    """A predictor in this process: its LLM is the reference the Ray actor is compared with."""
    return LLMPredictor(str(checkpoint), PARAMS, **ENGINE)


def test_importing_jaxinfer_does_not_import_ray():
    code = ("import sys, jaxinfer, jaxinfer.ray, jaxinfer.cli, jaxinfer.batch_job; jaxinfer.cli.build_parser(); "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_one_completion_per_row():
    with pytest.raises(ValueError, match="n must be 1"):
        LLMPredictor("not-loaded", {"n": 2, "temperature": 0.5})


def test_token_id_prompts_and_output_columns(local):
    ids = [np.array([5, 6, 7, 8]), np.array([9, 10, 11])]
    batch = {"prompt_token_ids": np.array(ids, dtype=object), "row": np.array([0, 1])}
    out = local(batch)
    expected = local.llm.generate([{"prompt_token_ids": i.tolist()} for i in ids], PARAMS, use_tqdm=False)
    assert set(OUTPUT_COLUMNS) | {"prompt_token_ids", "row"} == set(out)
    assert all(len(out[c]) == 2 for c in out)
    assert [t.tolist() for t in out["generated_tokens"]] == [e.outputs[0].token_ids for e in expected]
    assert list(out["generated_text"]) == [e.outputs[0].text for e in expected]
    assert out["num_input_tokens"].tolist() == [4, 3]
    assert out["num_generated_tokens"].tolist() == [len(e.outputs[0].token_ids) for e in expected]
    with pytest.raises(KeyError, match="'prompt' or a 'prompt_token_ids' column"):
        local({"text": np.array(["x"])})


@pytest.mark.slow
def test_map_batches_on_a_local_ray_equals_llm_generate(checkpoint, local):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
        ds = ds.map_batches(LLMPredictor, compute=ray.data.ActorPoolStrategy(size=1), batch_size=2,
                            fn_constructor_kwargs={"model": str(checkpoint), "sampling_params": PARAMS, **ENGINE})
        rows = sorted(ds.take_all(), key=lambda row: row["id"])
    finally:
        ray.shutdown()
    expected = local.llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [row["prompt"] for row in rows] == PROMPTS
    assert [row["generated_text"] for row in rows] == [e.outputs[0].text for e in expected]
    assert [list(row["generated_tokens"]) for row in rows] == [e.outputs[0].token_ids for e in expected]
    assert [row["num_input_tokens"] for row in rows] == [len(e.prompt_token_ids) for e in expected]
    assert [row["finish_reason"] for row in rows] == [e.outputs[0].finish_reason for e in expected]
